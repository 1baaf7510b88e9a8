"""Run from the checkout's root, `python -m`/`-c` put the root first on sys.path, where the bare
source folders would shadow installed packages of the same name (transformers imports the Hub's
``kernels`` package). Importing hybrid_lm removes the root again."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_root_does_not_shadow_installed_packages():
    code = ("import sys, hybrid_lm, hybrid_lm.kernels, importlib.util as u; "
            "spec = u.find_spec('kernels'); print(spec.origin if spec else None); "
            "print(hybrid_lm.kernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    shadow, ours = out.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert shadow == "None" or not Path(shadow).resolve().is_relative_to(ROOT / "kernels")


def test_a_root_on_pythonpath_is_kept():
    code = "import sys, hybrid_lm; print(sys.argv[1] in sys.path)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd="/", capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip() == "True"
