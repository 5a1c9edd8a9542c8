# shellcheck shell=bash
# What the recipes (through recipes/common.sh) and recipes/sweep.sh check before they print or run a
# command: the Python that will run verl, and the values of their variables. Sourced, never run.
#
# PYTHON: set in the environment, else the clone's .venv (`make setup` makes it), else `python3`. It must
# import verl and ta_opd_verl; the selectors are asked from the package itself (ta_opd_verl/config.py), so
# no list of them is kept here. A refused value stops the script with one line naming the variable, its
# value and what is accepted, and exit status 2.

CHECKS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -n "${PYTHON:-}" ]]; then
    PYTHON_ORIGIN="set in the environment"
elif [[ -x "$CHECKS_DIR/../.venv/bin/python" ]]; then
    PYTHON="$(cd "$CHECKS_DIR/.." && pwd)/.venv/bin/python"
    PYTHON_ORIGIN="the clone's .venv"
else
    PYTHON=python3
    PYTHON_ORIGIN="the default: no .venv in the clone"
fi

refuse() {
    echo "$0: $*" >&2
    exit 2
}

refuse_value() {
    local name="$1" value="$2" accepted="$3"
    refuse "$name: $(printf '%q' "$value") is not accepted; accepted: $accepted"
}

require_positive_integer() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || refuse_value "$1" "$2" "a positive integer (1, 2, ...)"
}

require_non_negative_integer() {
    [[ "$2" =~ ^(0|[1-9][0-9]*)$ ]] || refuse_value "$1" "$2" "a non-negative integer (0, 1, ...)"
}

# A budget ρ: written as Hydra reads a number (no leading zeros but one: 0.05, .05, 1, 5e-2), in (0, 1].
require_ratio() {
    if ! [[ "$2" =~ ^((0|[1-9][0-9]*)?\.[0-9]+|(0|[1-9][0-9]*)\.?)([eE][-+]?[0-9]+)?$ ]] ||
        ! awk -v ratio="$2" 'BEGIN { exit !(ratio > 0 && ratio <= 1) }'; then
        refuse_value "$1" "$2" "a number in (0, 1], the share of response positions trained on (e.g. 0.05)"
    fi
}

# The selectors ta_opd.selector accepts, from the package in PYTHON; asking proves that PYTHON imports verl
# and ta_opd_verl. Sets SELECTOR_CHOICES, and exports the answer for the same PYTHON so that the recipes a
# sweep runs (child processes) do not ask again (importing verl takes seconds).
ask_python_for_selectors() {
    if [[ -n "${TA_OPD_SELECTOR_CHOICES:-}" && "${TA_OPD_SELECTORS_FROM:-}" == "$PYTHON" ]]; then
        SELECTOR_CHOICES="$TA_OPD_SELECTOR_CHOICES"
        return 0
    fi
    local probe='import verl, ta_opd_verl; from ta_opd_verl.config import SELECTORS; print(*SELECTORS)'
    local output
    if ! output="$("$PYTHON" -c "$probe" 2>&1)"; then
        refuse "PYTHON=$PYTHON ($PYTHON_ORIGIN) cannot import verl and ta_opd_verl (${output##*$'\n'});" \
            "point PYTHON at the project's environment: PYTHON=/path/to/venv/bin/python bash $0"
    fi
    SELECTOR_CHOICES="${output##*$'\n'}"
    export TA_OPD_SELECTOR_CHOICES="$SELECTOR_CHOICES" TA_OPD_SELECTORS_FROM="$PYTHON"
}

require_selector() {
    local choice
    for choice in $SELECTOR_CHOICES; do
        [[ "$2" == "$choice" ]] && return 0
    done
    refuse_value "$1" "$2" "one of $SELECTOR_CHOICES"
}
