#!/usr/bin/env bash
# Print a folder holding transformers' tests/test_modeling_common.py (+ test_configuration_common.py) of the
# installed transformers version, fetched from its source distribution on PyPI (the wheel does not ship them).
set -euo pipefail
version=$(python -c "import transformers; print(transformers.__version__)")
folder=".ci/hf_tests/$version"
if [ ! -f "$folder/test_modeling_common.py" ]; then
    mkdir -p "$folder" .ci/hf_tests/sdist
    pip download -q --no-deps --no-binary :all: --no-build-isolation "transformers==$version" -d .ci/hf_tests/sdist >&2 \
        || pip download -q --no-deps --no-binary :all: "transformers==$version" -d .ci/hf_tests/sdist >&2
    tar xzf ".ci/hf_tests/sdist/transformers-$version.tar.gz" -C "$folder" --strip-components=2 \
        "transformers-$version/tests/test_modeling_common.py" "transformers-$version/tests/test_configuration_common.py"
fi
echo "$PWD/$folder"
