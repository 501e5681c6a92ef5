import re
from pathlib import Path

from rlhf import algos

DOC = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"


def test_algorithms_page_lists_every_registered_name_with_a_paper():
    text = DOC.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    for reg in (algos.ADVANTAGES, algos.POLICY_LOSSES, algos.KL_ESTIMATORS, algos.LOSS_AGGREGATIONS, algos.UPDATES):
        for name in reg.names():
            assert name in rows, f"{reg.kind} '{name}' is missing from docs/algorithms.md"
            assert re.search(r"(19|20)\d\d", rows[name]), f"'{name}' row names no paper"
    assert "docs/algorithms.md" in (DOC.parents[1] / "README.md").read_text()
