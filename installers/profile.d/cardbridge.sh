# CardBridge (cardbridge-server package): in an xrdp session, start the session's shim
# (once) and point the session's PC/SC programs at it. xrdp's startwm.sh sources
# /etc/profile, so this runs at session start-up, with $$ = the session's leader: the
# shim stops when the session ends.
if [ -n "${XRDP_SESSION:-}" ] && [ -n "${DISPLAY:-}" ] && command -v cdrsession >/dev/null 2>&1; then
    if [ -z "${CARDBRIDGE_SESSION_STARTED:-}" ]; then
        eval "$(cdrsession start --desk xrdp --until-pid $$ 2>>"${XDG_RUNTIME_DIR:-/tmp}/cardbridge-start.log")" \
            && CARDBRIDGE_SESSION_STARTED=1 && export CARDBRIDGE_SESSION_STARTED
    fi
fi
