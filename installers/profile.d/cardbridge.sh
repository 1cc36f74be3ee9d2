# CardBridge (cardbridge-server): the xrdp session hook. xrdp's startwm.sh sources
# /etc/profile, which sources this at session start-up with $$ = the session's leader: the
# session's shim starts (once) and stops when the session ends, and the session's PC/SC
# programs get PCSCLITE_CSOCK_NAME.
#
# Opt-in: nothing happens until the admin ran `cdrsession enable xrdp` (which creates
# /etc/cardbridge/enabled/xrdp). A start that fails is not marked as started: the session
# gets CARDBRIDGE_START_ERROR (the reason, which `cdrsession doctor` reports) and the
# reason is in the system log (journalctl -t cdrsession).
if [ -n "${XRDP_SESSION:-}" ] && [ -n "${DISPLAY:-}" ] && [ -z "${CARDBRIDGE_SESSION_STARTED:-}" ] &&
   [ -e "${CARDBRIDGE_ETC:-/etc/cardbridge}/enabled/xrdp" ] && command -v cdrsession >/dev/null 2>&1; then
    if cardbridge_start=$(cdrsession start --until-pid $$); then
        eval "$cardbridge_start" && unset CARDBRIDGE_START_ERROR &&
            CARDBRIDGE_SESSION_STARTED=1 && export CARDBRIDGE_SESSION_STARTED
    else
        case "$cardbridge_start" in
            CARDBRIDGE_START_ERROR=*) eval "$cardbridge_start" ;;
            *) CARDBRIDGE_START_ERROR="cdrsession start failed without a reason (crashed?)"
               export CARDBRIDGE_START_ERROR
               logger -t cdrsession -p user.err "CardBridge session start failed: $CARDBRIDGE_START_ERROR" 2>/dev/null ;;
        esac
    fi
    unset cardbridge_start
fi
