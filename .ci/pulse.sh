# Start/stop a private PulseAudio daemon with a sine-wave source as the default microphone.
start_pulse() {
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR_PULSE:-$(mktemp -d)}"
    chmod 700 "$XDG_RUNTIME_DIR"
    local pa="$XDG_RUNTIME_DIR/pulse.pa"
    cat >"$pa" <<'PA'
load-module module-native-protocol-unix
load-module module-null-sink sink_name=spk
load-module module-sine-source source_name=sine rate=48000 frequency=440
set-default-source sine
set-default-sink spk
PA
    pulseaudio -n -F "$pa" --daemonize=no --exit-idle-time=-1 >"$XDG_RUNTIME_DIR/pulse.log" 2>&1 &
    PULSE_PID=$!
    for _ in $(seq 50); do pactl info >/dev/null 2>&1 && break; sleep 0.1; done
    export EMICA_TEST_PULSE=1
}
stop_pulse() {
    [ -n "${PULSE_PID:-}" ] && kill "$PULSE_PID" 2>/dev/null || true
}
