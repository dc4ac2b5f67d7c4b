"""A pytest plugin for tests/test_selection.py: what a run selected and left out.

With ``-p selection_report`` (``tests/`` on the path), a run writes to the
JSON file ``$SELECTION_REPORT`` its selected and deselected items, each as
its node id and the names of its markers.
"""

import json
import os

_deselected: list = []


def _entries(items):
  return [
    {"id": item.nodeid, "markers": sorted({m.name for m in item.iter_markers()})}
    for item in items
  ]


def pytest_deselected(items):
  _deselected.extend(items)


def pytest_collection_finish(session):
  report = {"selected": _entries(session.items), "deselected": _entries(_deselected)}
  with open(os.environ["SELECTION_REPORT"], "w", encoding="utf-8") as f:
    json.dump(report, f)
