#!/usr/bin/env bash
# Download the licensed model assets EMICA Realtime needs, and verify the bundled sample data.
#
#   bash download_assets.sh                 # everything, into ./assets (asks for licences and the FLAME login)
#   bash download_assets.sh --only data     # offline: only check realtime/data against SHA256SUMS
#   bash download_assets.sh --help
#
# Layout written under the assets folder (what realtime.models.load_model reads):
#   FLAME/geometry/generic_model.pkl, landmark_embedding.npy, mediapipe_landmark_embedding.npz,
#   FLAME/geometry/head_template.obj, FLAME/mask/*.png, FLAME/geometry/fixed_uv_displacements/*.npy
#   MICA/model/mica.tar
#   FaceReconstruction/models/<EMICA model>/{cfg.yaml,checkpoints/...}
#   EMOCA/models/<EMOCA or DECA model>/{cfg.yaml,detail/checkpoints/...}
#
# Safe to re-run: finished parts are skipped, interrupted downloads resume (wget -c / curl -C -).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSETS="$ROOT/assets"
ASSUME_YES=0
COMPONENTS="data,flame,mica,emica,emoca"
EMOCA_MODELS="EMOCA_v2_lr_mse_20 EMOCA_v2_lr_cos_1.5 EMOCA_v2_mp EMOCA DECA"

FLAME_LOGIN_URL="https://download.is.tue.mpg.de/download.php?domain=flame&sfile=FLAME2020.zip&resume=1"
FLAME_EXTRAS_URL="https://download.is.tue.mpg.de/emoca/assets/FLAME.zip"
MICA_URL="https://keeper.mpdl.mpg.de/f/db172dc4bd4f4c0f96de/?dl=1"
EMICA_URL="https://download.is.tue.mpg.de/emote/FaceReconstruction.zip"
EMOCA_URL_BASE="https://download.is.tue.mpg.de/emoca/assets/EMOCA/models"

FAILED=()
DONE=()

usage() {
    cat <<'EOF'
Usage: bash download_assets.sh [--assets DIR] [--only LIST] [--yes] [--help]

Fetches the model assets of EMICA Realtime into DIR (default: ./assets next to this script):
  flame  FLAME 2020 head model (needs a free account at https://flame.is.tue.mpg.de; asks for the
         login, or reads FLAME_USERNAME / FLAME_PASSWORD) plus the FLAME UV masks, landmark
         embeddings and head template that inferno/EMOCA ship
  mica   MICA identity network, MICA/model/mica.tar
  emica  EMICA models (FaceReconstruction.zip, https://emote.is.tue.mpg.de licence)
  emoca  EMOCA v2 / EMOCA / DECA models (https://emoca.is.tue.mpg.de licence); needed for --mode detail
  data   verify the bundled sample files in realtime/data against realtime/data/SHA256SUMS (offline)

Options:
  --assets DIR   where to put the assets (created if missing)
  --only LIST    comma-separated subset of: data,flame,mica,emica,emoca (default: all)
  --yes          accept the licence prompts (you must still have agreed to the licences on the
                 websites above); for scripted use, FLAME credentials come from FLAME_USERNAME /
                 FLAME_PASSWORD
  -h, --help     show this help

Re-running skips what is already there and resumes interrupted downloads. The last lines list
anything that could not be fetched and how to retry it.
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --assets) [[ $# -ge 2 ]] || { echo "error: --assets needs a folder" >&2; exit 2; }; ASSETS="$2"; shift 2 ;;
        --assets=*) ASSETS="${1#*=}"; shift ;;
        --only) [[ $# -ge 2 ]] || { echo "error: --only needs a list" >&2; exit 2; }; COMPONENTS="$2"; shift 2 ;;
        --only=*) COMPONENTS="${1#*=}"; shift ;;
        --yes|-y) ASSUME_YES=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option '$1' (see: bash download_assets.sh --help)" >&2; exit 2 ;;
    esac
done

for c in ${COMPONENTS//,/ }; do
    case "$c" in
        data|flame|mica|emica|emoca) ;;
        *) echo "error: unknown component '$c' in --only (choose from data,flame,mica,emica,emoca)" >&2; exit 2 ;;
    esac
done

wants() { [[ ",$COMPONENTS," == *",$1,"* ]]; }

# ---------------------------------------------------------------------------------------------- helpers

confirm() {  # confirm "question" → 0 yes / 1 no
    [[ $ASSUME_YES -eq 1 ]] && return 0
    local answer
    while true; do
        read -r -p "$1 (y/n) " answer || return 1
        case "$answer" in
            [Yy]*) return 0 ;;
            [Nn]*) return 1 ;;
            *) echo "Please answer y or n." ;;
        esac
    done
}

urlencode() {  # percent-encode everything but unreserved characters
    local LC_ALL=C s="$1" out="" c i  # byte-wise, so UTF-8 passwords encode correctly
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [a-zA-Z0-9.~_-]) out+="$c" ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}

fetch() {  # fetch URL OUT [POST_DATA]: resumable download to OUT (via OUT.part), 0 on success
    local url="$1" out="$2" post="${3:-}" part="$2.part"
    mkdir -p "$(dirname "$out")"
    if command -v wget >/dev/null 2>&1; then
        if [[ -n "$post" ]]; then
            wget -q --show-progress -c --post-data "$post" -O "$part" "$url" || return 1
        else
            wget -q --show-progress -c -O "$part" "$url" || return 1
        fi
    elif command -v curl >/dev/null 2>&1; then
        if [[ -n "$post" ]]; then
            curl -fL --retry 3 -C - --data "$post" -o "$part" "$url" || return 1
        else
            curl -fL --retry 3 -C - -o "$part" "$url" || return 1
        fi
    else
        echo "  neither wget nor curl is installed (apt-get install -y wget)" >&2
        return 1
    fi
    mv -f "$part" "$out"
}

fetch_zip() {  # fetch_zip URL ZIP [POST_DATA]: download (or reuse) ZIP and check it is a complete zip
    local url="$1" zip="$2" post="${3:-}"
    if [[ -f "$zip" ]] && unzip -tq "$zip" >/dev/null 2>&1; then
        return 0
    fi
    fetch "$url" "$zip" "$post" || return 1
    if ! unzip -tq "$zip" >/dev/null 2>&1; then
        # A wrong login or an expired link answers with an HTML page instead of the archive.
        rm -f "$zip"
        echo "  $url did not return a valid zip archive (wrong login or licence not accepted on the website?)" >&2
        return 1
    fi
}

need_unzip() {
    command -v unzip >/dev/null 2>&1 && return 0
    echo "  unzip is not installed (apt-get install -y unzip)" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------- steps

verify_data() {
    echo "== Checking the bundled sample data (realtime/data)"
    local sums="$ROOT/realtime/data/SHA256SUMS"
    if [[ ! -f "$sums" ]]; then
        FAILED+=("data: $sums is missing (restore it with git checkout realtime/data)")
        return
    fi
    local report
    if report=$(cd "$ROOT/realtime/data" && sha256sum -c SHA256SUMS 2>&1); then
        echo "$report" | sed 's/^/  /'
        DONE+=("data: bundled files verified")
    else
        echo "$report" | sed 's/^/  /'
        local bad
        bad=$(echo "$report" | grep -v ': OK$' | sed 's/: .*//' | tr '\n' ' ')
        FAILED+=("data: checksum mismatch or missing in realtime/data: ${bad% } (restore with git checkout realtime/data)")
    fi
}

get_flame() {
    echo "== FLAME 2020"
    local model="$ASSETS/FLAME/geometry/generic_model.pkl"
    local extras_marker="$ASSETS/FLAME/geometry/landmark_embedding.npy"
    local login_problem=""
    echo "FLAME is licensed separately. Register and accept the licence at https://flame.is.tue.mpg.de"
    if ! confirm "Have you registered and agreed to the FLAME licence?"; then
        FAILED+=("flame: licence not accepted (register at https://flame.is.tue.mpg.de, then re-run)")
        return
    fi
    need_unzip || { FAILED+=("flame: unzip missing"); return; }

    if [[ -s "$model" ]]; then
        echo "  $model already there"
    else
        local user="${FLAME_USERNAME:-}" pass="${FLAME_PASSWORD:-}"
        if [[ -z "$user" && $ASSUME_YES -eq 0 ]]; then
            read -r -p "  Username (FLAME, flame.is.tue.mpg.de): " user || true
        fi
        if [[ -z "$pass" && $ASSUME_YES -eq 0 ]]; then
            read -r -s -p "  Password (FLAME): " pass || true
            echo
        fi
        if [[ -z "$user" || -z "$pass" ]]; then
            login_problem="no FLAME login given (set FLAME_USERNAME and FLAME_PASSWORD or run interactively)"
        else
            local zip="$ASSETS/downloads/FLAME2020.zip"
            local post="username=$(urlencode "$user")&password=$(urlencode "$pass")"
            if fetch_zip "$FLAME_LOGIN_URL" "$zip" "$post"; then
                mkdir -p "$ASSETS/FLAME/geometry"
                # FLAME2020.zip holds generic_model.pkl (plus the gendered models).
                local member
                member=$(unzip -Z1 "$zip" | grep -E '(^|/)generic_model\.pkl$' | head -n 1)
                if [[ -n "$member" ]] && unzip -p "$zip" "$member" > "$model.part" && mv -f "$model.part" "$model"; then
                    echo "  FLAME 2020 model → $model"
                else
                    rm -f "$model.part"
                    login_problem="FLAME2020.zip has no generic_model.pkl"
                fi
            else
                login_problem="FLAME2020.zip could not be fetched (check the login at https://flame.is.tue.mpg.de)"
            fi
        fi
    fi

    if [[ -s "$extras_marker" ]]; then
        echo "  FLAME landmark embeddings / masks already there"
    else
        local zip="$ASSETS/downloads/FLAME_inferno.zip"
        if fetch_zip "$FLAME_EXTRAS_URL" "$zip"; then
            # -n: never overwrite (keeps the generic_model.pkl fetched above)
            (cd "$ASSETS" && unzip -n -q "$zip") && echo "  FLAME extras → $ASSETS/FLAME" \
                || FAILED+=("flame: could not extract $zip")
        else
            FAILED+=("flame: FLAME extras (landmark embeddings, UV masks) from $FLAME_EXTRAS_URL")
        fi
    fi
    if [[ ! -s "$model" ]]; then
        FAILED+=("flame: ${login_problem:-$model is missing}")
    elif [[ -s "$extras_marker" ]]; then
        DONE+=("flame: $ASSETS/FLAME")
    fi
}

get_mica() {
    echo "== MICA"
    local tar="$ASSETS/MICA/model/mica.tar"
    if [[ -s "$tar" ]]; then
        echo "  $tar already there"
        DONE+=("mica: $tar")
        return
    fi
    echo "MICA is for non-commercial research use (licence: https://zielon.github.io/mica/)."
    if ! confirm "Do you accept the MICA licence terms?"; then
        FAILED+=("mica: licence not accepted")
        return
    fi
    if fetch "$MICA_URL" "$tar"; then
        DONE+=("mica: $tar")
    else
        FAILED+=("mica: $MICA_URL")
    fi
}

get_emica() {
    echo "== EMICA models (FaceReconstruction)"
    local marker="$ASSETS/FaceReconstruction/models/EMICA-CVT_flame2020_notexture/cfg.yaml"
    if [[ -s "$marker" ]]; then
        echo "  $ASSETS/FaceReconstruction/models already there"
        DONE+=("emica: $ASSETS/FaceReconstruction/models")
        return
    fi
    echo "EMICA models: register and accept the licence at https://emote.is.tue.mpg.de"
    if ! confirm "Have you registered and agreed to the EMOTE/EMICA licence?"; then
        FAILED+=("emica: licence not accepted (https://emote.is.tue.mpg.de)")
        return
    fi
    need_unzip || { FAILED+=("emica: unzip missing"); return; }
    local zip="$ASSETS/downloads/FaceReconstruction.zip"
    if fetch_zip "$EMICA_URL" "$zip" && (cd "$ASSETS" && unzip -n -q "$zip"); then
        DONE+=("emica: $ASSETS/FaceReconstruction/models")
    else
        FAILED+=("emica: $EMICA_URL")
    fi
}

get_emoca() {
    echo "== EMOCA / DECA models"
    echo "EMOCA models: register and accept the licence at https://emoca.is.tue.mpg.de"
    if ! confirm "Have you registered and agreed to the EMOCA licence?"; then
        FAILED+=("emoca: licence not accepted (https://emoca.is.tue.mpg.de)")
        return
    fi
    need_unzip || { FAILED+=("emoca: unzip missing"); return; }
    local models="$ASSETS/EMOCA/models" name zip
    mkdir -p "$models"
    for name in $EMOCA_MODELS; do
        if [[ -s "$models/$name/cfg.yaml" ]]; then
            echo "  $name already there"
            DONE+=("emoca: $models/$name")
            continue
        fi
        zip="$ASSETS/downloads/EMOCA_$name.zip"
        if fetch_zip "$EMOCA_URL_BASE/$name.zip" "$zip" && (cd "$models" && unzip -n -q "$zip"); then
            DONE+=("emoca: $models/$name")
        else
            FAILED+=("emoca: $name ($EMOCA_URL_BASE/$name.zip)")
        fi
    done
}

# ---------------------------------------------------------------------------------------------- main

wants data && verify_data
if wants flame || wants mica || wants emica || wants emoca; then
    mkdir -p "$ASSETS" || { echo "error: cannot create the assets folder $ASSETS" >&2; exit 2; }
    ASSETS="$(cd "$ASSETS" && pwd)"
    echo "Assets folder: $ASSETS"
fi
wants flame && get_flame
wants mica && get_mica
wants emica && get_emica
wants emoca && get_emoca

echo
echo "== Summary"
for line in "${DONE[@]+"${DONE[@]}"}"; do echo "  ok:     $line"; done
if [[ ${#FAILED[@]} -gt 0 ]]; then
    for line in "${FAILED[@]}"; do echo "  FAILED: $line"; done
    echo "Re-run 'bash download_assets.sh' to retry; finished parts are skipped, partial downloads resume."
    exit 1
fi
echo "  everything requested is in place."
