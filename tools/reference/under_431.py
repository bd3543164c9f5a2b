"""Runs a fixture builder under transformers 4.31.0, upstream Emu2's pinned version.

transformers 4.31 cannot live in the main reference venv (transformers 5.x), so a builder that needs
it calls `build_under_431` from its `build()`: inside a 4.31 interpreter the builder runs directly;
otherwise its own file is re-run as a script under the interpreter its environment variable names.
"""
import pathlib
import subprocess
from typing import Callable


def build_under_431(
    module_file: str,
    out_dir: pathlib.Path,
    build: Callable[[pathlib.Path], None],
    ref_python: str,
    env_var: str,
    requirements: str,
) -> None:
    try:
        import transformers

        native = transformers.__version__ == "4.31.0"
    except ImportError:
        native = False
    if native:
        build(pathlib.Path(out_dir))
        return
    if not pathlib.Path(ref_python).exists():
        raise SystemExit(
            f"{pathlib.Path(module_file).stem} needs transformers 4.31 in its own venv: create {ref_python} from "
            f"tools/reference/{requirements} or set {env_var}"
        )
    subprocess.run([ref_python, str(pathlib.Path(module_file).resolve()), str(out_dir)], check=True)
