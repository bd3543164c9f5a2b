#!/usr/bin/env bash
# Runs the cargo-fuzz targets of emu-rs for a bounded time each, one job,
# with corpora seeded from tests/fixtures (and ../shared/reference when it is
# beside the checkout), and prints how many inputs each target survived.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET ...]   # default: 120 s, every target
#
# Targets are `crate/target`, e.g. emu-vision/jpeg. cargo-fuzz needs a nightly
# compiler; on stable, RUSTC_BOOTSTRAP=1 (set here) lets it pass -Z flags.
# Install it with `cargo install cargo-fuzz`. A crash leaves its input in
# <crate>/fuzz/artifacts/<target>/ and stops the run with a non-zero status.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-120}"
shift || true
all=(
    emu-vision/jpeg emu-vision/image
    emu-core/safetensors emu-core/torch_zip emu-core/pickle emu-core/index
    emu-prompt/sentencepiece emu-prompt/markup emu-prompt/grounding
    emu-decoder/configs
)
targets=("${@:-${all[@]}}")
fx="$root/tests/fixtures"
shared="$root/../shared/reference"

# Copies the files given on stdin (one path a line) that exist and are under
# 1 MB into the corpus folder $1.
seed() {
    mkdir -p "$1"
    while read -r f; do
        if [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 1048576 ]; then
            cp "$f" "$1/$(echo "$f" | md5sum | cut -c1-16)-$(basename "$f")"
        fi
    done
}

seed_target() { # crate target corpus-dir
    case "$1/$2" in
        emu-vision/jpeg | emu-vision/image)
            { find "$fx" -name '*.jpg' -o -name '*.png'; find "$shared/emu2-examples" -name '*.jpg' 2>/dev/null; } | seed "$3"
            # The jpeg target prepends the SOI marker itself.
            if [ "$2" = jpeg ]; then
                for f in "$3"/*.jpg; do [ -f "$f" ] && tail -c +3 "$f" >"$f.body" && mv "$f.body" "$f"; done
                rm -f "$3"/*.png
            fi
            ;;
        emu-core/safetensors) find "$fx" -name '*.safetensors' | seed "$3" ;;
        emu-core/torch_zip) find "$fx" -name '*.bin' | seed "$3" ;;
        emu-core/pickle)
            mkdir -p "$3"
            for f in $(find "$fx" -name '*.bin' -size -1024k); do
                unzip -Z1 "$f" 2>/dev/null | grep 'data.pkl$' | while read -r e; do
                    unzip -p "$f" "$e" >"$3/$(echo "$f$e" | md5sum | cut -c1-16).pkl"
                done
            done
            ;;
        emu-core/index) find "$fx" -name '*.index*.json' | seed "$3" ;;
        emu-prompt/sentencepiece)
            mkdir -p "$3"
            if [ -f "$shared/emu2-conf/llama_config/tokenizer.model" ]; then
                # The real model (500 kB) is slow per run: seed its first pieces.
                head -c 4096 "$shared/emu2-conf/llama_config/tokenizer.model" >"$3/llama-head.model"
            fi
            find "$fx" -name 'tokenizer.model' | seed "$3"
            ;;
        emu-prompt/markup) mkdir -p "$3"; printf '%s' '{image a.png} a {object box=1,2,30,40 phrase="x" subject=s.png}' >"$3/seed" ;;
        emu-prompt/grounding) mkdir -p "$3"; printf '%s' 'the dog [12, 30, 200, 220] and <box>[1,2,3,4]</box>' >"$3/seed" ;;
        emu-decoder/configs)
            { find "$fx" -name '*config*.json'; find "$shared" -name '*config*.json' 2>/dev/null; } | seed "$3"
            ;;
    esac
}

export RUSTC_BOOTSTRAP=1
summary=()
for t in "${targets[@]}"; do
    crate="${t%%/*}"
    name="${t#*/}"
    dir="$root/$crate/fuzz"
    corpus="$dir/corpus/$name"
    if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus" 2>/dev/null)" ]; then
        seed_target "$crate" "$name" "$corpus"
    fi
    log="$dir/fuzz-$name.log"
    echo "== $t: ${secs}s, corpus $(ls "$corpus" | wc -l) files"
    (cd "$dir" && cargo fuzz run -O "$name" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10 \
        2>&1 | tee "$log" | grep -E 'Done|ERROR|panicked|SUMMARY' || true)
    runs="$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || echo '?')"
    if grep -q 'ERROR\|panicked' "$log"; then
        summary+=("$t: CRASH after ${runs} runs (see $dir/artifacts/$name)")
    else
        summary+=("$t: ${runs} runs in ${secs}s, no crash")
    fi
done
printf '%s\n' "${summary[@]}"
