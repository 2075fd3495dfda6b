#!/usr/bin/env bash
# Build the fedfew image with no image registry and no package index (deploy/README.md,
# "Building the image offline"), with buildah:
#   1. a Debian bookworm base (python3 3.11, as the official image) made by mmdebstrap from this
#      host's apt sources, imported as localhost/fedfew-base:bookworm;
#   2. every wheel the image needs, downloaded by this host's pip (its own index, mirror or
#      find-links folder) and linked into deploy/wheels for the build only;
#   3. `buildah bud` of deploy/Dockerfile with WHEELS_ONLY=1 (pip sees no index) and the labels
#      naming the code version.
# Usage: deploy/build-image-offline.sh [TAG]          (default: localhost/fedfew:VERSION)
# Environment:
#   FEDFEW_IMAGE_CACHE  the base tarball and the wheels, kept for the next build
#                       (default ~/.cache/fedfew-image; delete base-*.tar for a newer base)
#   PYTHON              the Python whose pip downloads the wheels (default python3; 3.11)
#   APT_SOURCES         the apt sources mmdebstrap uses (default: this host's Debian sources)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CACHE=${FEDFEW_IMAGE_CACHE:-$HOME/.cache/fedfew-image}
SUITE=bookworm
BASE=localhost/fedfew-base:$SUITE
BASE_TAR=$CACHE/base-$SUITE.tar
VERSION=$("$PYTHON" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
TAG=${1:-localhost/fedfew:$VERSION}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install -y buildah mmdebstrap)" >&2; exit 1; }
done
mkdir -p "$CACHE"

# 1. The base image, from the cached tarball when there is one.
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    if [ ! -s "$BASE_TAR" ]; then
        if [ -z "${APT_SOURCES:-}" ]; then
            for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
                if [ -s "$candidate" ]; then APT_SOURCES=$candidate; break; fi
            done
        fi
        echo "making the $SUITE base with mmdebstrap (${APT_SOURCES:-the default Debian mirror})"
        mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$BASE_TAR.part" ${APT_SOURCES:+"$APT_SOURCES"}
        mv "$BASE_TAR.part" "$BASE_TAR"
    fi
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$BASE_TAR" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$container"
    buildah commit --quiet --rm "$container" "$BASE" >/dev/null
fi

# 2. The wheels, downloaded again only when the requirements change.
requirements=$("$PYTHON" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')")
requirements=$(printf '%s\nsetuptools>=69\n' "$requirements")
if [ "$(cat "$CACHE/wheels/.requirements" 2>/dev/null)" != "$requirements" ]; then
    rm -rf "$CACHE/wheels"
    printf '%s\n' "$requirements" > "$CACHE/requirements.txt"
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$CACHE/wheels" \
        -r "$CACHE/requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true
    ls "$CACHE/wheels"/torch-*.whl >/dev/null  # the download failed if torch is missing
    printf '%s\n' "$requirements" > "$CACHE/wheels/.requirements"
fi
linked=()
cleanup() { for wheel in "${linked[@]}"; do rm -f "deploy/wheels/$wheel"; done; }
trap cleanup EXIT
for path in "$CACHE/wheels"/*.whl; do
    wheel=$(basename "$path")
    [ -e "deploy/wheels/$wheel" ] && continue
    ln "$path" "deploy/wheels/$wheel" 2>/dev/null || cp "$path" "deploy/wheels/$wheel"
    linked+=("$wheel")
done

# 3. The image; --layers keeps the dependency layer while only the code changes. (chroot
#    isolation shares the host's network; WHEELS_ONLY=1 gives pip no index to reach.) The
#    labels are given again with --label: buildah 1.28 reuses a cached LABEL layer even when
#    the build argument in it changed, and --label is applied to the final image.
buildah bud --isolation chroot --layers --quiet \
    -f deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore \
    --build-arg BASE_IMAGE="$BASE" --build-arg WHEELS_ONLY=1 \
    --build-arg FEDFEW_VERSION="$VERSION" --build-arg FEDFEW_REVISION="$REVISION" \
    --label org.opencontainers.image.version="$VERSION" \
    --label org.opencontainers.image.revision="$REVISION" \
    -t "$TAG" . >/dev/null
echo "built $TAG ($(buildah images --format '{{.Size}}' "$TAG" | head -n 1)), revision $REVISION"
