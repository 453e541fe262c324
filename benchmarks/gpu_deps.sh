#!/usr/bin/env bash
# Fill the git-ignored .gpudeps/ with the pure-Python dependencies that a bare GPU image (torch,
# numpy, sentencepiece, ... but no DeepSpeed, Hydra or pydantic, and no package index) lacks, so
# that benchmarks/gpu_check.sh runs there with PYTHONPATH=.gpudeps/site:. and installs nothing.
#
# Run on a machine with this project's .venv and access to the package index:
#     bash benchmarks/gpu_deps.sh [TARGET_PYTHON_VERSION]     (default 3.12)
# Then carry .gpudeps to the GPU machine (it stays out of git through .git/info/exclude).
#
# - deepspeed, hydra, omegaconf, antlr4, hjson, pydantic, annotated_types, typing_inspection and
#   typing_extensions (pydantic 2.14 needs >= 4.16, newer than some images' copy) are pure Python:
#   copied from .venv with their *.dist-info.
# - pydantic_core is compiled: the manylinux x86-64 wheel of the same version for the target CPython
#   is downloaded and unpacked; .venv's own build of that version is put beside it, so either
#   interpreter finds its .so.
# - wandb is not copied: glm_train imports it only with run.wandb=true.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYVER="${1:-3.12}"
PYTAG="cp${PYVER//./}"
VENV_PY="$ROOT/.venv/bin/python"
SITE_SRC="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEST="$ROOT/.gpudeps"
SITE="$DEST/site"
WHL="$DEST/whl"
PKGS=(deepspeed hydra omegaconf antlr4 hjson pydantic annotated_types typing_inspection)
DISTS=(deepspeed hydra_core omegaconf antlr4_python3_runtime hjson pydantic annotated_types typing_inspection
       typing_extensions)

rm -rf "$SITE"
mkdir -p "$SITE" "$WHL"
for p in "${PKGS[@]}"; do
    test -d "$SITE_SRC/$p" || { echo "missing package $p in $SITE_SRC" >&2; exit 1; }
    cp -a "$SITE_SRC/$p" "$SITE/"
done
cp -a "$SITE_SRC/typing_extensions.py" "$SITE/"
for d in "${DISTS[@]}"; do
    found=("$SITE_SRC/$d"-*.dist-info)
    test -d "${found[0]}" || { echo "missing $d-*.dist-info in $SITE_SRC" >&2; exit 1; }
    cp -a "${found[@]}" "$SITE/"
done

# pydantic_core: the compiled wheel of the installed version for the target interpreter.
PDC_VERSION="$("$VENV_PY" -c 'import importlib.metadata as m; print(m.version("pydantic_core"))')"
wheel=("$WHL"/pydantic_core-"$PDC_VERSION"-"$PYTAG"-"$PYTAG"-*manylinux*x86_64*.whl)
if [ ! -f "${wheel[0]}" ]; then
    ok=0
    for plat in "manylinux_2_17_x86_64 manylinux2014_x86_64" "manylinux_2_28_x86_64" "manylinux_2_34_x86_64" \
                "manylinux_2_5_x86_64 manylinux1_x86_64"; do
        args=()
        for p in $plat; do args+=(--platform "$p"); done
        if "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
                --implementation cp "${args[@]}" -d "$WHL" "pydantic-core==$PDC_VERSION"; then
            ok=1
            break
        fi
    done
    [ "$ok" = 1 ] || { echo "could not download a $PYTAG manylinux wheel of pydantic-core==$PDC_VERSION" >&2; exit 1; }
    wheel=("$WHL"/pydantic_core-"$PDC_VERSION"-"$PYTAG"-"$PYTAG"-*manylinux*x86_64*.whl)
fi
"$VENV_PY" - "${wheel[0]}" "$SITE" <<'EOF'
import sys
import zipfile

zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
EOF

# Also this machine's build of the same version (same Python sources, only the .so differs): each
# interpreter loads the one tagged for it, so `import deepspeed` works here too and can be checked.
cp -a "$SITE_SRC"/pydantic_core/_pydantic_core.cpython-*.so "$SITE/pydantic_core/"

find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$SITE" -name "*.pyc" -delete

# Keep it out of git without touching .gitignore.
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/.gpudeps/" "$EXCLUDE" 2>/dev/null || echo "/.gpudeps/" >> "$EXCLUDE"

# Checks: size, compiled files, and that importing DeepSpeed compiles or loads no op.
size_mib=$(du -sm "$DEST" | cut -f1)
echo "size of .gpudeps: ${size_mib} MiB"
[ "$size_mib" -lt 60 ] || { echo ".gpudeps is ${size_mib} MiB, over the 60 MiB budget" >&2; exit 1; }
echo "compiled files (only pydantic_core's expected):"
find "$SITE" \( -name "*.so" -o -name "*.so.*" -o -name "*.pyd" \) -printf "  %P\n"
if find "$SITE" \( -name "*.so" -o -name "*.so.*" \) -not -path "*/pydantic_core/*" | grep -q .; then
    echo "unexpected compiled file outside pydantic_core" >&2
    exit 1
fi
PYTHONPATH="$SITE:$ROOT" PYTHONDONTWRITEBYTECODE=1 DS_ACCELERATOR=cpu "$VENV_PY" - <<'EOF'
import torch.utils.cpp_extension as ext

calls = []


def refuse(*a, **k):
    calls.append(k.get("name", a[0] if a else "?"))
    raise RuntimeError("an op would be JIT-compiled at import time")


ext.load = ext.load_inline = refuse
import deepspeed  # noqa: E402
import deepspeed.pipe  # noqa: E402,F401
import deepspeed.runtime.bf16_optimizer  # noqa: E402,F401
import deepspeed.runtime.zero.stage_1_and_2  # noqa: E402,F401
import hjson  # noqa: E402,F401
import hydra  # noqa: E402
import omegaconf  # noqa: E402

src = deepspeed.__file__
assert "/.gpudeps/site/" in src, src
assert not calls, calls
print(f"import check (this machine): deepspeed {deepspeed.__version__} from {src}, hydra {hydra.__version__}, "
      f"omegaconf {omegaconf.__version__}; no op compiled at import")
EOF
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
ls "$SITE"
