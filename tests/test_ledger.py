import json

import pytest

from dmlib import ledger


def test_rows_are_kept_per_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "LEDGER_DIR", tmp_path)
    row = {"quantity": "q", "value": "1", "compare_with": "DDPM", "what_differs": "d"}
    monkeypatch.setenv("DMLIB_PROFILE", "cpu")
    ledger.record("01_x", [row])
    monkeypatch.setenv("DMLIB_PROFILE", "test")
    ledger.record("01_x", [row | {"value": "2"}])  # a quick run must not overwrite the website's numbers
    assert ledger.load("cpu")["01_x"][0]["value"] == "1"
    assert ledger.load()["01_x"][0]["value"] == "2"


def test_incomplete_row_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "LEDGER_DIR", tmp_path)
    with pytest.raises(ValueError, match="what_differs"):
        ledger.record("01_x", [{"quantity": "q", "value": "1", "compare_with": "DDPM"}])


def test_published_results_are_complete_and_checked():
    rows = ledger.published()
    assert rows, "data/published.json is empty"
    for row in rows:
        assert {
            "method",
            "paper",
            "dataset",
            "metric",
            "value",
            "setting",
            "where",
            "status",
        } <= row.keys(), row
        assert row["status"] in ("verified", "corrected"), json.dumps(row)
