"""A remote-code export loads and generates in a fresh interpreter where ``hybrid_lm`` cannot be
imported: the folder must carry all the model code it needs.

The child runs the venv's python with ``-I`` (isolated: no PYTHONPATH, no user site, no cwd on the
path), so the editable install's path hook is the only way back to our source; a meta-path finder
installed before anything else refuses ``hybrid_lm`` outright, and the child checks that the name
really is unimportable before loading.
"""
import ast
import json
import subprocess
import sys

import pytest
import torch
from export_helpers import prompt, save_tiny

from hybrid_lm.export.api import export_checkpoint

CHILD = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hybrid_lm" or name.startswith("hybrid_lm."):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
try:
    import hybrid_lm  # noqa: F401
    raise SystemExit("hybrid_lm is importable in the isolated child")
except ModuleNotFoundError:
    pass

import json, os, torch
from transformers import AutoModelForCausalLM

out, prompt = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
x = torch.tensor(prompt)
with torch.no_grad():
    logits = model(x).logits
tokens = model.generate(x[:1], do_sample=False, max_new_tokens=20)
loaded = sorted(m for m in sys.modules if m.startswith("hybrid_lm"))
print(json.dumps({"logits": logits.tolist(), "tokens": tokens.tolist(), "hybrid_lm_modules": loaded,
                  "class": type(model).__name__, "module": type(model).__module__}))
"""


@pytest.mark.slow
def test_remote_export_works_without_hybrid_lm(tmp_path):
    src, model = save_tiny(tmp_path, "remote_titans")
    out = export_checkpoint(src, tmp_path / "hf")
    for path in out.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("hybrid_lm"), (path, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("hybrid_lm") for a in node.names), path
    x = prompt()
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HF_MODULES_CACHE": str(tmp_path / "modules_cache"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(out), json.dumps(x.tolist())],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hybrid_lm_modules"] == []
    assert result["class"] == "HybridLMForCausalLM" and result["module"].startswith("transformers_modules")
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(result["logits"]), model(x).logits, rtol=0, atol=1e-6)
    assert result["tokens"] == model.generate(x[:1], 20).tolist()
