"""Django settings for Loft. Every value comes from the environment (see loft/env.py)."""

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from engine.hyperparameters import ConfigError
from engine.plan import WorkerClass
from loft.env import Env, loft_home

env = Env()
BASE_DIR = Path(__file__).resolve().parent.parent
LOFT_HOME = loft_home()

# No default for the secret: the embedded stack writes one to $LOFT_HOME/env, production sets it.
SECRET_KEY = env.string("DJANGO_SECRET_KEY")
DEBUG = env.boolean("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.csv("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.csv("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "loft.admin_site.LoftAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "loft",
    "jobs",
]

MIDDLEWARE = [
    "loft.observability.RequestMetricsMiddleware",
    "loft.nul_bytes.RejectNulMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "loft.tenancy.NoOrganizationMiddleware",
]

ROOT_URLCONF = "loft.urls"
WSGI_APPLICATION = "loft.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "loft.tenancy.current_org_context",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env.string("DATABASE_URL"), conn_max_age=60, conn_health_checks=True
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.string("DJANGO_STATIC_ROOT", str(LOFT_HOME / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "static"]

# --- Security --------------------------------------------------------------------------------
# Production is served over HTTPS, by a proxy in front that terminates TLS: unless DEBUG is on,
# cookies travel only over HTTPS and browsers are told to come back by HTTPS only (HSTS, sent
# on HTTPS requests). `make run` and the tests serve plain HTTP on 127.0.0.1 and set
# LOFT_HTTPS=false (loft/embedded.py). Each setting can also be set on its own.
LOFT_HTTPS = env.boolean("LOFT_HTTPS", default=not DEBUG)
SESSION_COOKIE_SECURE = env.boolean("DJANGO_SESSION_COOKIE_SECURE", LOFT_HTTPS)
CSRF_COOKIE_SECURE = env.boolean("DJANGO_CSRF_COOKIE_SECURE", LOFT_HTTPS)
SECURE_HSTS_SECONDS = env.integer(
    "DJANGO_SECURE_HSTS_SECONDS", 365 * 24 * 3600 if LOFT_HTTPS else 0
)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.boolean("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env.boolean("DJANGO_SECURE_HSTS_PRELOAD", False)
# The proxy usually redirects plain HTTP itself; the containers' healthchecks speak plain HTTP.
SECURE_SSL_REDIRECT = env.boolean("DJANGO_SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
# The header by which the proxy says the client used HTTPS, e.g. X-Forwarded-Proto (its value
# must then be "https"). Only behind a proxy that sets it on every request: a client could
# send it too.
SECURE_PROXY_SSL_HEADER = env.https_header("DJANGO_SECURE_PROXY_SSL_HEADER")
# The reverse proxies in front of Loft (addresses or CIDR ranges): a request from one of them
# is counted against the client that X-Forwarded-For names, read from the right past every
# trusted hop (loft/auth.py, client_address). Empty: REMOTE_ADDR is the client.
LOFT_TRUSTED_PROXIES = env.networks("LOFT_TRUSTED_PROXIES")
# Wrong API keys one address may send per minute with the same first characters before they
# get 429 (loft/auth.py); a valid key is never refused. 0: no limit.
LOFT_AUTH_FAILURES_PER_MINUTE = env.integer("LOFT_AUTH_FAILURES_PER_MINUTE", 30)
# Failed sign-ins (/login, /admin/login/) one address may make for one username in the window
# before that address must wait, even with the right password. 0: no limit.
LOFT_LOGIN_FAILURE_LIMIT = env.integer("LOFT_LOGIN_FAILURE_LIMIT", 10)
LOFT_LOGIN_FAILURE_WINDOW_SECONDS = env.integer("LOFT_LOGIN_FAILURE_WINDOW_SECONDS", 15 * 60)

# --- Broker (Celery) -------------------------------------------------------------------------
# Redis (Valkey locally): the broker, and the channel playground answers stream back through
# (worker/serving.py). A deployment with another broker still sets REDIS_URL for the latter.
REDIS_URL = env.get("REDIS_URL") or env.string("CELERY_BROKER_URL")
CELERY_BROKER_URL = env.get("CELERY_BROKER_URL") or REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = "default"
# The database row is the truth; the message is a hint. A task is acknowledged only after it
# ran, is redelivered if its worker dies, and a worker takes one message at a time.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Periodic upkeep (worker/tasks.py, worker/maintenance.py), sent by `celery beat` to the queue
# LOFT_MAINTENANCE_QUEUE; every one of them is safe to run twice or late.
LOFT_MAINTENANCE_QUEUE = env.string("LOFT_MAINTENANCE_QUEUE", "default")
LOFT_REAPER_EVERY_SECONDS = env.number("LOFT_REAPER_EVERY_SECONDS", 30.0)
# A waiting job, upload, evaluation or merge older than LOFT_RESEND_GRACE_SECONDS whose message
# the broker no longer holds gets it again (worker/maintenance.py, resend_lost_hints).
LOFT_RESEND_EVERY_SECONDS = env.number("LOFT_RESEND_EVERY_SECONDS", 60.0)
LOFT_RESEND_GRACE_SECONDS = env.integer("LOFT_RESEND_GRACE_SECONDS", 60)
# Continual policies (jobs/continual.py) are looked at this often: due runs start, running
# ones move on.
LOFT_CONTINUAL_EVERY_SECONDS = env.number("LOFT_CONTINUAL_EVERY_SECONDS", 60.0)
_maintenance = {"queue": LOFT_MAINTENANCE_QUEUE, "expires": 600}
CELERY_BEAT_SCHEDULE = {
    "reap-stale-jobs": {
        "task": "worker.tasks.reap_stale_jobs",
        "schedule": LOFT_REAPER_EVERY_SECONDS,
        "options": {**_maintenance, "expires": max(LOFT_REAPER_EVERY_SECONDS, 5)},
    },
    "send-overdue-webhooks": {
        "task": "worker.tasks.send_overdue_webhooks",
        "schedule": 60.0,
        "options": _maintenance,
    },
    "abort-abandoned-uploads": {
        "task": "worker.tasks.abort_abandoned_uploads",
        "schedule": 3600.0,
        "options": _maintenance,
    },
    "sweep-orphan-objects": {
        "task": "worker.tasks.sweep_orphan_objects",
        "schedule": 6 * 3600.0,
        "options": _maintenance,
    },
    "resend-lost-hints": {
        "task": "worker.tasks.resend_lost_hints",
        "schedule": LOFT_RESEND_EVERY_SECONDS,
        "options": {**_maintenance, "expires": max(LOFT_RESEND_EVERY_SECONDS, 5)},
    },
    "roll-up-usage": {
        "task": "worker.tasks.roll_up_usage",
        "schedule": 3600.0,
        "options": _maintenance,
    },
    "expire-stored-completions": {
        "task": "worker.tasks.expire_stored_completions",
        "schedule": 3600.0,
        "options": _maintenance,
    },
    "advance-continual-policies": {
        "task": "worker.tasks.advance_continual_policies",
        "schedule": LOFT_CONTINUAL_EVERY_SECONDS,
        "options": {**_maintenance, "expires": max(LOFT_CONTINUAL_EVERY_SECONDS, 5)},
    },
    "forget-unused-base-scores": {
        "task": "worker.tasks.forget_unused_base_scores",
        "schedule": 24 * 3600.0,
        "options": _maintenance,
    },
}
# A multipart upload still open after this long was abandoned (its request died).
LOFT_ABANDONED_UPLOAD_SECONDS = env.integer("LOFT_ABANDONED_UPLOAD_SECONDS", 24 * 3600)
# An object no row owns is deleted once it is this old: younger, its row may still be coming
# (an upload writes the object before the row commits).
LOFT_ORPHAN_GRACE_SECONDS = env.integer("LOFT_ORPHAN_GRACE_SECONDS", 24 * 3600)
# A base's kept evaluation results (jobs/models/base_scores.py) nobody read for this long are
# deleted: a change of the scoring code or of a library leaves the old ones unread for good.
LOFT_BASE_SCORES_UNUSED_SECONDS = env.integer("LOFT_BASE_SCORES_UNUSED_SECONDS", 30 * 24 * 3600)

# --- Jobs ------------------------------------------------------------------------------------
# Training workers of a class consume that class's queue, ``<this>.<class>`` (jobs/tasks.py
# training_queue): jobs, custom evaluations and merges are routed to a class by pre-flight.
LOFT_TRAINING_QUEUE = env.string("LOFT_TRAINING_QUEUE", "train")
# A training worker loads the base model the next job most likely wants as it starts
# (worker/warm_start.py), so the first job after a start does not wait for it.
LOFT_WORKER_PRELOAD = env.boolean("LOFT_WORKER_PRELOAD", True)
LOFT_HEARTBEAT_SECONDS = env.integer("LOFT_HEARTBEAT_SECONDS", 10)
# How often each worker process reports itself (host, queues, device, memory) to /ops/.
LOFT_WORKER_HEARTBEAT_SECONDS = env.number("LOFT_WORKER_HEARTBEAT_SECONDS", 10.0)
# A running job whose heartbeat is older than this is taken to have lost its worker.
LOFT_LEASE_SECONDS = env.integer("LOFT_LEASE_SECONDS", 60)
LOFT_MAX_ATTEMPTS = env.integer("LOFT_MAX_ATTEMPTS", 3)
# An attempt that object storage failed waits this long times its number, then resumes.
LOFT_STORAGE_RETRY_SECONDS = env.number("LOFT_STORAGE_RETRY_SECONDS", 30.0)
LOFT_JOB_SOFT_TIME_LIMIT_SECONDS = env.integer("LOFT_JOB_SOFT_TIME_LIMIT_SECONDS", 12 * 3600)

# This host's worker class (engine/plan.py WorkerClass), which its training workers publish
# with their heartbeats and consume the queue of: memory per device, throughput on one device
# for a 135M model (bench/train.py on 2 CPU cores: ~150 tokens/s), devices per worker (a job
# with gpus > 1 runs on one worker of a class with that many), and the cost of an hour of one
# worker in any unit: pre-flight sends a job to the class where it costs least among those it
# fits. On a web host without LOFT_WORKER_CLASSES these figures are the embedded worker's.
LOFT_WORKER_CLASS = env.string("LOFT_WORKER_CLASS", "cpu")
LOFT_WORKER_MEMORY_BYTES = env.integer("LOFT_WORKER_MEMORY_BYTES", 12 * 2**30)
LOFT_WORKER_TOKENS_PER_SECOND = env.integer("LOFT_WORKER_TOKENS_PER_SECOND", 150)
LOFT_WORKER_BYTES_PER_ACTIVATION = env.integer("LOFT_WORKER_BYTES_PER_ACTIVATION", 4)
LOFT_WORKER_DEVICE_KIND = env.string("LOFT_WORKER_DEVICE_KIND", "cpu")
LOFT_WORKER_DEVICES = env.integer("LOFT_WORKER_DEVICES", 1)
LOFT_WORKER_COST_PER_HOUR = env.number("LOFT_WORKER_COST_PER_HOUR", 1.0)
# The classes pre-flight plans against before their workers have reported (a JSON list of
# WorkerClass fields, e.g. docker-compose.yml's two); with it set, the figures above describe
# only a worker's own class. Classes workers published are known for LOFT_WORKER_CLASS_MEMORY
# seconds after their last heartbeat, so a job for a class whose workers are all down waits
# for them rather than failing.
LOFT_WORKER_CLASSES = env.json("LOFT_WORKER_CLASSES", [])
for _declared in LOFT_WORKER_CLASSES:  # refused here, at start, rather than at every request
    try:
        WorkerClass.from_dict(_declared)
    except ConfigError as _error:
        raise ImproperlyConfigured(f"LOFT_WORKER_CLASSES: {_error}") from None
LOFT_WORKER_CLASS_MEMORY_SECONDS = env.integer("LOFT_WORKER_CLASS_MEMORY_SECONDS", 7 * 24 * 3600)

# Evaluation at the end of every job: greedy answers on up to this many held-out rows.
LOFT_EVAL_MAX_GENERATIONS = env.integer("LOFT_EVAL_MAX_GENERATIONS", 50)
LOFT_EVAL_MAX_NEW_TOKENS = env.integer("LOFT_EVAL_MAX_NEW_TOKENS", 64)
# ... and on (up to this many questions of) Loft's general probe set, engine/probes.jsonl, to
# show what the adapter forgot; 0 turns that check off.
LOFT_EVAL_FORGETTING_PROBES = env.integer("LOFT_EVAL_FORGETTING_PROBES", 100)
# The base's half of those results is kept (jobs/models/base_scores.py) and read again by the
# next job on the same base and rows; off, every evaluation scores its base (bench/iteration.py
# compares the two).
LOFT_EVAL_KEEP_BASE_SCORES = env.boolean("LOFT_EVAL_KEEP_BASE_SCORES", True)

# --- Inference (playground): workers of this queue keep one base model loaded and switch among
# up to LOFT_INFERENCE_ADAPTERS of its adapters without reloading it (worker/serving.py), at
# the base precision the adapters were trained on.
LOFT_INFERENCE_QUEUE = env.string("LOFT_INFERENCE_QUEUE", "inference")
LOFT_INFERENCE_ADAPTERS = env.integer("LOFT_INFERENCE_ADAPTERS", 8)
# Requests one engine answers at once, in one running batch (engine/batching.py); 1 answers them
# one at a time (bench/serve.py compares the two).
LOFT_INFERENCE_BATCH_ROWS = env.integer("LOFT_INFERENCE_BATCH_ROWS", 32)
# The longest a playground request holds its web thread, queueing to last token (the page's two
# answers together); the worker stops generating for it then too.
LOFT_INFERENCE_TIMEOUT_SECONDS = env.integer("LOFT_INFERENCE_TIMEOUT_SECONDS", 60)
# Generate requests one organization may have running at once (each holds a web thread); more
# get 429 (jobs/inference.py). 0: no limit. An organization's Quota row may set its own.
LOFT_INFERENCE_CONCURRENT_PER_ORG = env.integer("LOFT_INFERENCE_CONCURRENT_PER_ORG", 4)
# Tokens one organization may ask for per window (LOFT_INFERENCE_RATE_WINDOW_SECONDS, a minute):
# each request reserves its prompt and its max_tokens when admitted, as OpenAI counts them; past
# the budget, 429 until the window ends. 0: no limit. An organization's Quota row may set its own.
LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG = env.integer(
    "LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG", 200_000
)
LOFT_INFERENCE_RATE_WINDOW_SECONDS = env.integer("LOFT_INFERENCE_RATE_WINDOW_SECONDS", 60)
LOFT_INFERENCE_MAX_TOKENS = env.integer("LOFT_INFERENCE_MAX_TOKENS", 1024)
# Days a chat completion asked with store: true is kept (then deleted by beat); 0 stores none.
# An organization's Quota row may set its own.
LOFT_STORED_COMPLETION_DAYS = env.integer("LOFT_STORED_COMPLETION_DAYS", 30)

# --- Aliases: a candidate adapter moves an alias only on evidence (jobs/promotion.py): a gain on
# some pinned eval file whose paired-bootstrap 95 % interval (this many resamples, fixed seed)
# lies above zero, no file's score dropping by more than MAX_DROP (absolute), and at most this
# share of the general probes lost.
LOFT_PROMOTION_MAX_DROP = env.number("LOFT_PROMOTION_MAX_DROP", 0.02)
LOFT_PROMOTION_MAX_PROBES_LOST = env.number("LOFT_PROMOTION_MAX_PROBES_LOST", 0.10)
LOFT_PROMOTION_BOOTSTRAP_SAMPLES = env.integer("LOFT_PROMOTION_BOOTSTRAP_SAMPLES", 2000)

# --- Operations: /metrics answers staff sessions, and scrapers that send this token (if set).
LOFT_METRICS_TOKEN = env.string("LOFT_METRICS_TOKEN", "")

# --- Quotas: defaults for organizations without their own (jobs.models.Quota); 0 = none ----
LOFT_QUOTA_CONCURRENT_JOBS = env.integer("LOFT_QUOTA_CONCURRENT_JOBS", 4)
LOFT_QUOTA_STORAGE_BYTES = env.integer("LOFT_QUOTA_STORAGE_BYTES", 50 * 2**30)
LOFT_QUOTA_MONTHLY_TRAINED_TOKENS = env.integer("LOFT_QUOTA_MONTHLY_TRAINED_TOKENS", 0)

# --- Webhooks --------------------------------------------------------------------------------
# Deliveries have a queue of their own, with its own workers (docker-compose.yml's `webhooks`,
# loft/stack.py), so that a slow receiver never holds a training worker.
LOFT_WEBHOOK_QUEUE = env.string("LOFT_WEBHOOK_QUEUE", "webhooks")
# The whole of one attempt, name lookup to the last byte of the answer; past it, the attempt
# failed and is retried.
LOFT_WEBHOOK_TIMEOUT_SECONDS = env.integer("LOFT_WEBHOOK_TIMEOUT_SECONDS", 10)
# Endpoints one organization may register (each event is sent to every one of them).
LOFT_WEBHOOK_MAX_ENDPOINTS = env.integer("LOFT_WEBHOOK_MAX_ENDPOINTS", 20)
# Seconds before each retry of an undelivered event; when they run out, the delivery failed.
LOFT_WEBHOOK_RETRY_DELAYS = env.integers("LOFT_WEBHOOK_RETRY_DELAYS", [10, 60, 300, 1800, 7200])
# Off, webhooks go only to public addresses (no SSRF into Loft's network). Turn it on where the
# receivers are on the same machine or network, e.g. `make run` on a laptop, and in tests.
LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = env.boolean("LOFT_WEBHOOK_ALLOW_PRIVATE_URLS", False)

# --- Object storage (S3) ---------------------------------------------------------------------
S3_ENDPOINT_URL = env.get("S3_ENDPOINT_URL")  # None means AWS itself
S3_REGION = env.string("S3_REGION", "us-east-1")
S3_BUCKET = env.string("S3_BUCKET", "loft")
S3_ACCESS_KEY_ID = env.get("S3_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY_ID")
S3_SECRET_ACCESS_KEY = env.get("S3_SECRET_ACCESS_KEY") or env.get("AWS_SECRET_ACCESS_KEY")

# --- Datasets --------------------------------------------------------------------------------
LOFT_MAX_UPLOAD_BYTES = env.integer("LOFT_MAX_UPLOAD_BYTES", 2**30)
# Up to this size an upload is validated while the client waits; larger ones in a worker.
LOFT_INLINE_VALIDATION_MAX_BYTES = env.integer("LOFT_INLINE_VALIDATION_MAX_BYTES", 16 * 2**20)
# ... and while it takes at most this long: tokenizing costs up to ~2 s per MB of text without
# spaces, so an upload whose inline pass runs over goes on in a worker, and the request (under
# gunicorn's 120 s timeout) answers with status "uploaded".
LOFT_INLINE_VALIDATION_SECONDS = env.integer("LOFT_INLINE_VALIDATION_SECONDS", 15)
# Of a larger upload, this much is parsed before it is accepted (twice the longest allowed row).
LOFT_HEAD_CHECK_BYTES = env.integer("LOFT_HEAD_CHECK_BYTES", 4 * 2**20)

# --- API -------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "loft.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["loft.auth.IsOrganizationMember"],
    "DEFAULT_RENDERER_CLASSES": ["loft.api.renderers.FastJSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "loft.api.negotiation.JsonFallbackNegotiation",
    "EXCEPTION_HANDLER": "loft.api.errors.openai_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Loft API",
    "DESCRIPTION": "OpenAI-compatible fine-tuning API, plus Loft's adapters and evaluations.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and its docs page are public (the code is open source); every call is not.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

# JSON lines by default (loft/observability.py), with the job and organization ids where the
# code knows them; LOFT_LOG_FORMAT=plain for classic lines. Celery uses this too (loft/celery.py).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "loft.observability.JsonFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": env.string("LOFT_LOG_FORMAT", "json"),
        }
    },
    "root": {"handlers": ["console"], "level": env.string("LOFT_LOG_LEVEL", "INFO")},
    "loggers": {"botocore": {"level": "WARNING"}, "urllib3": {"level": "WARNING"}},
}
