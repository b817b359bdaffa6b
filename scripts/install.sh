#!/usr/bin/env bash
# Installs fastes and everything it needs on a fresh machine with only Python and pip.
# Never replaces an installed torch; where none is, installs torch==2.13.0.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install: keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
# Build requirements first: the extension is built without isolation so it links the torch above.
"$PYTHON" -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.10" ninja
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PYTHON" -c "import fastes; print('install: fastes', fastes.__version__, 'backends', fastes.backends())"
