"""The Python snippet of README.md runs as written (between the python-example markers)."""

import re

import numpy as np

from conftest import repo_root
from mla_reference import check_outputs, reference

BEGIN = "<!-- python-example:begin -->"
END = "<!-- python-example:end -->"


def readme_snippet() -> str:
    text = (repo_root() / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README.md needs exactly one pair of python-example markers"
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    m = re.search(r"```python\n(.*?)```", block, re.S)
    assert m, "no ```python block between the markers"
    return m.group(1)


def test_readme_snippet_has_upstreams_shape():
    code = readme_snippet()
    assert "from flashmla import get_mla_metadata, flash_mla_with_kvcache" in code
    assert "get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)" in code
    assert "for i in range(num_layers):" in code
    assert "tile_scheduler_metadata, num_splits, causal=True," in code


def test_readme_snippet_runs_and_is_right():
    ns = {"__name__": "readme_example"}
    exec(compile(readme_snippet(), "README.md:python-example", "exec"), ns)
    # The last layer's result against the float64 reference.
    o, lse = ns["o_i"], ns["lse_i"]
    q, k = ns["q_i"], ns["kvcache_i"]
    ref_out, ref_lse = reference(
        q.astype(np.float64), k.astype(np.float64), ns["block_table"], ns["cache_seqlens"], causal=True
    )

    class Case:
        pass

    case = Case()
    case.q, case.ref_out, case.ref_lse = q, ref_out, ref_lse
    check_outputs(o, lse, case, q.dtype)
