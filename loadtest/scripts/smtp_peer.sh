#!/usr/bin/env bash
# SMTP acceptance, Concierge against Postfix, in one run (issue 5, "Performance").
#
# Measures messages/s accepted (250 after the final dot) with smtp_bench at each concurrency in
# $SESSIONS, for:
#   - concierge serve -> a private redis-server with `appendfsync always`, then `everysec`
#     (appendonly yes; data dir on the same disk as the Postfix queue);
#   - a private Postfix instance (config dir + queue in the run's temp dir): smtpd on
#     127.0.0.1:$PF_PORT, loopback only, no DNS, mail discarded after queueing. Postfix's
#     cleanup fsyncs the queue file before smtpd answers 250: equal durability to `always`.
# Everything is bounded, listens on 127.0.0.1 only, and is stopped on exit (trap).
#
# Usage (from the workspace root, after
#   cargo build --release -p concierge-proxy -p concierge-loadtest --example smtp_bench):
#   MESSAGES=4000 ROUNDS=3 loadtest/scripts/smtp_peer.sh
# Environment: SESSIONS ("10 100"), MESSAGES (3000 per measurement), BYTES (10240), ROUNDS (1),
# IDLE (1000 idle sessions for the memory figure), CONCIERGE_BIN, SMTP_BENCH_BIN.
# Needs root (Postfix), redis-server and Debian's postfix package.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${CONCIERGE_BIN:-$ROOT/target/release/concierge}
BENCH=${SMTP_BENCH_BIN:-$ROOT/target/release/examples/smtp_bench}
SESSIONS=${SESSIONS:-"10 100"}
MESSAGES=${MESSAGES:-3000}
BYTES=${BYTES:-10240}
ROUNDS=${ROUNDS:-1}
RCPT=support@example.com
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=${REDIS_PORT:-$(free_port)}
SMTP_PORT=${SMTP_PORT:-$(free_port)}
PF_PORT=${PF_PORT:-$(free_port)}

for f in "$BIN" "$BENCH"; do [ -x "$f" ] || { echo "missing $f (build first, see the header)" >&2; exit 2; }; done
command -v redis-server >/dev/null || { echo "redis-server not installed" >&2; exit 2; }
[ -x /usr/sbin/postfix ] || { echo "postfix not installed: apt-get install -y postfix" >&2; exit 2; }

# Same disk as the system's spool (/var), so Redis' AOF and Postfix's queue share it.
WORK=$(mktemp -d /var/tmp/smtp-peer.XXXXXX)
CONCIERGE_PID= REDIS_PID= PF_UP=
cleanup() {
    [ -n "$CONCIERGE_PID" ] && kill "$CONCIERGE_PID" 2>/dev/null && wait "$CONCIERGE_PID" 2>/dev/null
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
    [ -n "$PF_UP" ] && /usr/sbin/postfix -c "$WORK/pf/etc" stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on 127.0.0.1:$1" >&2
    return 1
}

RESULTS=$WORK/results
: >"$RESULTS"
bench() { # label sessions port
    local line rate
    line=$("$BENCH" "127.0.0.1:$3" "$RCPT" "$2" "$MESSAGES" "$BYTES")
    rate=$(sed -E 's/.*"per_second":([0-9.]+).*/\1/' <<<"$line")
    printf '%-34s sessions=%-4s %s\n' "$1" "$2" "$line" >&2
    echo "$1 $2 $rate" >>"$RESULTS"
}

# --- Redis (private, AOF on) and Concierge -------------------------------------------------
mkdir -p "$WORK/redis" "$WORK/concierge"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save '' \
    --appendonly yes --appendfsync always --daemonize no --logfile "$WORK/redis/log" &
REDIS_PID=$!
wait_port "$REDIS_PORT"
cat >"$WORK/concierge/concierge.toml" <<EOF
[server]
quic_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "$WORK/concierge/data"
shutdown_grace = "2s"

[store]
backend = "redis"
url = "redis://127.0.0.1:$REDIS_PORT"

[agents.helpdesk]
token = "bench-token-0123456789"
[agents.helpdesk.wake]
driver = "none"
policy = "never"

[smtp]
listen = "127.0.0.1:$SMTP_PORT"
hostname = "mx.example.com"
domains = ["example.com"]
greeting_delay = "0s"
max_connections = 2000
max_connections_per_ip = 2000
[smtp.addresses]
support = "helpdesk"
EOF
RUST_LOG=${CONCIERGE_LOG:-warn} "$BIN" serve --config "$WORK/concierge/concierge.toml" \
    >"$WORK/concierge/log" 2>&1 &
CONCIERGE_PID=$!
wait_port "$SMTP_PORT" || { tail -20 "$WORK/concierge/log" >&2; exit 1; }

# --- Postfix (private instance) ------------------------------------------------------------
PF=$WORK/pf
mkdir -p "$PF/etc" "$PF/spool" "$PF/data"
chmod 755 "$WORK"
chown postfix "$PF/data"
awk -v port="$PF_PORT" '
    /^smtp[ \t]+inet/ { print "127.0.0.1:" port " inet n - n - - smtpd"; next }
    /^(submission|smtps|submissions)[ \t]+inet/ { next }
    /^[a-z0-9]/ && NF >= 8 { $5 = "n" }   # no chroot for the private instance
    { print }' /etc/postfix/master.cf >"$PF/etc/master.cf"
cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
myhostname = mx-peer.example.net
mydomain = example.net
myorigin = \$myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains = example.com
relay_transport = discard
default_transport = discard
local_transport = discard
local_recipient_maps =
alias_maps =
alias_database =
disable_dns_lookups = yes
smtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 300
message_size_limit = 52428800
biff = no
EOF
/usr/sbin/postfix -c "$PF/etc" check >/dev/null 2>&1 || true
/usr/sbin/postfix -c "$PF/etc" start >"$PF/start.log" 2>&1 || { cat "$PF/start.log" "$PF/maillog" >&2 2>/dev/null; exit 1; }
PF_UP=1
wait_port "$PF_PORT"

# --- Measurement ---------------------------------------------------------------------------
# Memory per idle session (first, on a fresh process): RSS of `concierge serve` before and
# after $IDLE sessions that sent EHLO and then wait (Postfix runs one smtpd process per session).
IDLE=${IDLE:-1000}
python3 - "$CONCIERGE_PID" "$SMTP_PORT" "$IDLE" >"$WORK/idle" <<'PY'
import socket, sys, time
pid, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rss = lambda: int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1])
time.sleep(0.5)
before, conns = rss(), []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.recv(512)
    s.sendall(b"EHLO idle.test\r\n")
    conns.append(s)
for s in conns:
    s.recv(4096)
time.sleep(1)
after = rss()
print(f"idle sessions={n} rss_before_kib={before} rss_after_kib={after} per_session_kib={(after - before) / n:.1f}")
for s in conns:
    s.close()
PY

"$BENCH" "127.0.0.1:$SMTP_PORT" "$RCPT" 10 200 "$BYTES" >/dev/null   # warm-up
"$BENCH" "127.0.0.1:$PF_PORT" "$RCPT" 10 200 "$BYTES" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
    for s in $SESSIONS; do
        redis-cli -p "$REDIS_PORT" config set appendfsync always >/dev/null
        bench concierge/redis-always "$s" "$SMTP_PORT"
        bench postfix "$s" "$PF_PORT"
        redis-cli -p "$REDIS_PORT" config set appendfsync everysec >/dev/null
        bench concierge/redis-everysec "$s" "$SMTP_PORT"
    done
done

echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $MESSAGES messages x $BYTES bytes per run, $ROUNDS round(s)"
printf '%-8s %18s %18s %12s %14s\n' sessions concierge/always postfix ratio concierge/everysec
for s in $SESSIONS; do
    avg() { awk -v l="$1" -v s="$s" '$1 == l && $2 == s { t += $3; n++ } END { printf "%.1f", n ? t / n : 0 }' "$RESULTS"; }
    a=$(avg concierge/redis-always) p=$(avg postfix) e=$(avg concierge/redis-everysec)
    printf '%-8s %18s %18s %12s %14s\n' "$s" "$a" "$p" "$(awk -v a="$a" -v p="$p" 'BEGIN { printf "%.2f", p ? a / p : 0 }')" "$e"
done
cat "$WORK/idle"
