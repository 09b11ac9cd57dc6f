"""experiments.upcycle_router_study: its shortcut (routers applied to the dense model's captured FFN inputs) is the
upcycled model's routing at step 0, which the study checks itself against the real model for its first seed."""
from __future__ import annotations

from experiments.upcycle_router_study import main
from tests.upcycle.test_app import hf_with_tokenizer  # noqa: F401  (the fixture: a tiny Llama with a BPE tokenizer)


def test_the_study_matches_the_real_upcycled_model(hf_with_tokenizer, tmp_path):  # noqa: F811
    out = tmp_path / "study.md"
    text = main([str(hf_with_tokenizer), "--seeds", "0", "1", "--heldout-tokens", "48", "--out", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith(("| normal", "| mean_free"))]
    assert [r.split("|")[1].strip() + r.split("|")[2].strip() for r in rows] == ["normal0", "mean_free0", "normal1",
                                                                                "mean_free1"]
    checks = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(checks) == 2 and all("rows equal the applied ones" in c and "(the same as above)" in c for c in checks)
    assert all(float(c.split("max |Δ logit| ")[1].split(",")[0]) < 1e-5 for c in checks)
