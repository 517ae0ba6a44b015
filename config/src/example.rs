/// The quickstart configuration, fully commented: an embedded store, the `echo` agent woken by
/// running `concierge agent echo`, and a `demo` webhook route whose replies are POSTed to a
/// local listener (`concierge inbox`).
pub const EXAMPLE: &str = r#"# Concierge configuration — quickstart.
#
# Every setting can be overridden from the environment: CONCIERGE_<SECTION>__<KEY>, with `__`
# between the parts of the key path, e.g.
#   CONCIERGE_SERVER__HTTP_LISTEN=0.0.0.0:8080
#   CONCIERGE_STORE__BACKEND=redis  CONCIERGE_STORE__URL_ENV=REDIS_URL
#   CONCIERGE_AGENTS__ECHO__WAKE__SLEEP_AFTER=5m
# Relative paths are resolved against the directory of this file.
# Durations are written like "500ms", "30s", "10m", "7d"; sizes like 1048576, "64KiB", "8MiB", "1MB".
# A secret `x` may be given inline (x = "..."), from an environment variable (x_env = "VAR")
# or from a file (x_file = "path", trailing newline trimmed) — exactly one of them.

[server]
# UDP address of the QUIC listener that agents dial.
quic_listen = "127.0.0.1:4433"
# HTTP ingress for webhooks: POST /hooks/<agent>/<route>.
http_listen = "127.0.0.1:8080"
# Admin API, dashboard, /metrics, /livez, /readyz. When this is not a loopback address a
# bearer token is required: admin_token, admin_token_env or admin_token_file.
admin_listen = "127.0.0.1:9090"
# admin_token_env = "CONCIERGE_ADMIN_TOKEN"
# A second token that can read the dashboard, API and /metrics but perform no action.
# admin_read_token_env = "CONCIERGE_ADMIN_READ_TOKEN"
# Per-agent metric labels for at most this many agents (those with the most buffered events);
# fleet-wide totals are always exported.
# metrics_agent_labels = 100
# The host:port agents are told to dial (defaults to quic_listen).
# public_addr = "agents.example.com:4433"
# TLS name agents verify.
server_name = "localhost"
# Embedded store and the generated development certificate live here.
data_dir = "./concierge-data"
# Largest agent-protocol frame.
max_frame = "8MiB"
# Default webhook body limit.
max_body = "1MiB"
# How long shutdown waits for in-flight work.
shutdown_grace = "10s"
# On SIGTERM /readyz fails at once, but webhooks and agents are still served this long, so a
# load balancer polling readiness stops routing here before the listeners close.
shutdown_delay = "1s"

# Without [tls], a self-signed development certificate is generated in data_dir and its
# SHA-256 fingerprint printed, for agents to pin.
# [tls]
# cert = "tls/fullchain.pem"
# key = "tls/key.pem"

[store]
# "embedded" (SQLite in data_dir, single node, zero setup) or "redis" (production, scale-out).
backend = "embedded"
# path = "./concierge-data/store.db"        # embedded only
# url_env = "REDIS_URL"                     # redis only: url / url_env / url_file
# How long platform redeliveries are recognised and dropped.
dedupe_ttl = "7d"
# Acked events kept per agent for replay from the dashboard.
retain_acked = 0
# How long an idempotent send's result is remembered.
send_ttl = "1d"

# One table per agent; the id is what the agent sends in Hello.
[agents.echo]
# The agent's token: token / token_env / token_file / token_sha256 (hex), exactly one.
# Inline only because this is a loopback demo: in production use token_sha256 here and give
# the agent its token through its own secret store.
token = "quickstart-echo-token"
# Most unacknowledged events in flight to this agent (caps the credit it asks for).
window = 1024
# Buffer cap for this agent, in events.
max_pending = 100000

[agents.echo.wake]
# "none" | "exec" | "http" | "fly"
driver = "exec"
# The echo agent ships inside the concierge binary, so a wake takes milliseconds.
command = ["concierge", "agent", "echo"]
# Extra environment for the command. The proxy's own CONCIERGE_* variables are not inherited;
# the driver adds CONCIERGE_AGENT, CONCIERGE_CONNECT, CONCIERGE_SERVER_NAME and
# CONCIERGE_CERT_SHA256, and the SDK reads the token from CONCIERGE_TOKEN.
env = { CONCIERGE_TOKEN = "quickstart-echo-token" }
# How long a wake waits for the command to exit before treating it as a running daemon.
settle = "2s"
# "immediate" | "never" | "coalesce(30s)"
policy = "immediate"
# After the driver returns, the agent must connect within this.
connect_timeout = "30s"
max_attempts = 5
backoff_initial = "500ms"
backoff_max = "30s"
# After max_attempts, keep retrying this often (events keep buffering).
unreachable_retry = "5m"
# Put the agent to sleep after this long idle with nothing pending (omit: never).
sleep_after = "30s"

# Inbound webhooks: POST http://127.0.0.1:8080/hooks/echo/demo
[webhooks.demo]
agent = "echo"
# "none" | "standard" (Standard Webhooks) | "hmac" (hex HMAC-SHA256 of the body in hmac_header);
# the last two need secret / secret_env / secret_file.
verify = "none"
# max_body = "1MiB"
# The agent's replies through this route are POSTed here.
reply_url = "http://127.0.0.1:8099/replies"
# reply_secret_env = "DEMO_REPLY_SECRET"

# Telegram bot (uncomment to use). Updates go to the agent; the agent replies through the bot.
# [telegram.support]
# agent = "echo"
# token_env = "TELEGRAM_BOT_TOKEN"          # token / token_env / token_file: "<bot id>:<secret>"
# mode = "poll"                             # "poll" (Concierge long-polls getUpdates) | "webhook"
# poll_timeout = "30s"                      # getUpdates long-poll timeout
# allowed_updates = ["message", "edited_message", "callback_query"]   # [] = Telegram's default set
# api_base = "https://api.telegram.org"
# chat_interval = "1s"                      # least time between two messages to one chat
# bot_rate = 30                             # most API calls per second for the bot
# Webhook mode: Telegram POSTs to <public_url>/telegram/support with this secret in
# X-Telegram-Bot-Api-Secret-Token; set_webhook = true makes Concierge call setWebhook at start-up.
# webhook_secret_env = "TELEGRAM_WEBHOOK_SECRET"
# set_webhook = true
# public_url = "https://concierge.example.com"

# WhatsApp Business Cloud API number (uncomment to use). Point the app's webhook at
# <public URL>/whatsapp/main (GET verification and POST notifications).
# [whatsapp.main]
# agent = "echo"
# app_secret_env = "WHATSAPP_APP_SECRET"    # key of X-Hub-Signature-256
# verify_token_env = "WHATSAPP_VERIFY_TOKEN"
# access_token_env = "WHATSAPP_ACCESS_TOKEN"
# phone_number_id = "106540352242922"
# graph_base = "https://graph.facebook.com"
# api_version = "v23.0"

# Span export (uncomment to use): Concierge's tracing spans (ingest -> store, wake, replay)
# are batched to an OpenTelemetry collector over OTLP/HTTP protobuf (<otlp_endpoint>/v1/traces).
# Batching follows the standard OTEL_BSP_* variables (OTEL_BSP_SCHEDULE_DELAY, ms).
# [telemetry]
# otlp_endpoint = "http://127.0.0.1:4318"
# service_name = "concierge"
"#;
