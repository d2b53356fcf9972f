"""The one settings object: defaults, then an optional TOML file, then BANKLLM_* environment, then CLI flags.

Nothing else in bankllm reads os.environ; everything reads a Settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .errors import ConfigError

ENV_PREFIX = "BANKLLM_"


def _doc(text: str, **extra) -> dict:
    return {"help": text, **extra}


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("bankllm", appauthor=False))


def default_config_dir() -> Path:
    return Path(platformdirs.user_config_dir("bankllm", appauthor=False))


@dataclass
class Settings:
    """Every tunable of bankllm, each with a description (shown by `bankllm settings`)."""

    # --- general -----------------------------------------------------------------------------
    debug: bool = field(default=False, metadata=_doc("Show tracebacks on errors."))
    data_dir: Path = field(default_factory=default_data_dir, metadata=_doc(
        "Where bankllm keeps the embedded base checkpoint, caches and builds."))
    threads: int = field(default=0, metadata=_doc(
        "CPU threads for llama.cpp (0 = all physical cores)."))

    # --- build and quality gate --------------------------------------------------------------
    gate_ship_below: float = field(default=0.05, metadata=_doc(
        "Perplexity increase over f16 under which a quant ships silently (0.05 = 5%)."))
    gate_warn_below: float = field(default=0.15, metadata=_doc(
        "Perplexity increase under which a quant ships with a warning."))
    gate_escalate_below: float = field(default=0.30, metadata=_doc(
        "Perplexity increase under which the gate moves up to the next quant; above it the quant is refused."))
    gate_n_ctx: int = field(default=512, metadata=_doc(
        "Context length of each perplexity chunk (the second half of each chunk is scored, as llama-perplexity does)."))
    gate_max_chunks: int = field(default=0, metadata=_doc(
        "Use at most this many chunks of the gate text (0 = all)."))
    exemplars_per_label: int = field(default=0, metadata=_doc(
        "Encode at most this many of an adapter's exemplars per label for the exemplar vote, the first in its "
        "exemplars.csv (0 = all). Encoding is most of a build's time: the shipped adapter's 9,262 exemplars took "
        "400-435 s on 2 cores merged, 706 s as a LoRA beside the base; fewer build faster and vote on less."))
    # --- per-adapter gate (issue 13): appliance/pipeline/adapters.py ----------------------------
    adapter_gate_max_kld: float = field(default=0.5, metadata=_doc(
        "Refuse an adapter whose mean KL divergence (quantized base + adapter vs its own f16 merge) exceeds this, "
        "whatever its perplexity (measured on the default base: the right adapter 0.059; no adapter or a wrong "
        "one 0.82 while perplexity fell 21%, which the perplexity bands alone would ship)."))
    quant_ladder: list[str] = field(default_factory=lambda: ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"], metadata=_doc(
        "Quantizations that --quant auto walks, lowest bit first."))
    min_free_disk_factor: float = field(default=4.0, metadata=_doc(
        "Refuse a build unless free disk is at least this many times the base checkpoint's size."))
    # --- intake limits: adapter archives and downloads, bundles (issue 11) -------------------
    fetch_timeout_s: float = field(default=900.0, metadata=_doc(
        "Overall deadline for fetching an adapter from a URL (connect, redirects and the whole body), in seconds."))
    fetch_max_bytes: int = field(default=4 << 30, metadata=_doc(
        "Largest adapter download accepted (bytes); a larger body is refused while it arrives."))
    adapter_archive_max_bytes: int = field(default=4 << 30, metadata=_doc(
        "Largest total size of the files in an adapter archive (bytes), checked from its headers and while "
        "unpacking (a LoRA adapter of a 70B model in fp32 is about 3.3 GB)."))
    adapter_archive_max_members: int = field(default=1000, metadata=_doc(
        "Most entries (files and directories) an adapter archive may hold."))
    bundle_max_bytes: int = field(default=256 << 30, metadata=_doc(
        "Largest total size of the files in a bundle (bytes): wheels plus the model, checked from its headers and "
        "while unpacking."))
    bundle_max_members: int = field(default=10000, metadata=_doc("Most entries a bundle may hold."))

    # --- service -----------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=_doc("Address the service binds to (loopback by default)."))
    port: int = field(default=8080, metadata=_doc("TCP port of the service."))
    model: Path | None = field(default=None, metadata=_doc(
        "GGUF file or build directory to serve (a build directory's model.gguf)."))
    model_name: str = field(default="bankllm", metadata=_doc("Model id reported by /v1/models and accepted in requests."))
    n_seq_max: int = field(default=8, metadata=_doc("Most sequences decoded together (continuous batching slots); each has its own KV stream of seq_ctx tokens."))
    seq_ctx: int = field(default=2048, metadata=_doc("Most tokens (prompt + completion) of one sequence."))
    queue_max: int = field(default=64, metadata=_doc("Requests allowed to wait for a slot; more get 503."))
    decode_lanes: int = field(default=2, metadata=_doc(
        "llama.cpp contexts that decode different adapters' requests at the same time, each on its share of the "
        "threads (1: adapters take turns in one context). A second lane is made only once two adapters (or an "
        "adapter and the base) run at once, only with threads >= 2, and costs a KV cache of n_seq_max x seq_ctx "
        "tokens."))
    gpu_layers: int = field(default=0, metadata=_doc(
        "Model layers libllama offloads to a GPU (0: CPU only; -1: all). Needs llama-cpp-python built with a GPU "
        "backend (`bankllm doctor` says whether it is)."))
    max_tokens_cap: int = field(default=1024, metadata=_doc("Largest max_tokens a request may ask for."))
    max_body_bytes: int = field(default=256 * 1024, metadata=_doc("Largest request body accepted."))
    request_timeout_s: float = field(default=120.0, metadata=_doc("A request still running after this is cancelled (504)."))
    rate_limit_per_minute: int = field(default=600, metadata=_doc("Requests per minute allowed per API key (0 = no limit)."))
    keys_file: Path | None = field(default=None, metadata=_doc(
        "File of API key hashes; default: $CREDENTIALS_DIRECTORY/api-keys, else <config dir>/api-keys."))
    require_keys: bool = field(default=True, metadata=_doc("Require an API key on every route but /health."))
    audit_log: Path | None = field(default=None, metadata=_doc("JSON-lines audit log file (default: standard error)."))
    audit_include_text: bool = field(default=False, metadata=_doc(
        "Record prompt and completion text in the audit log, with card numbers, IBANs, account numbers, sort codes, "
        "CVV/PIN codes, e-mails, phones and SSNs masked (appliance/service/masking.py lists the categories)."))
    # audit trail (chained lines, rotation): appliance/service/audit.py
    audit_rotate_bytes: int = field(default=100 * 1024 * 1024, metadata=_doc(
        "Start a new audit log file when the current one would grow past this many bytes (0 = never): the full one "
        "is renamed <audit_log>.N (N = 1 the oldest) and the hash chain carries on in a new file."))
    conversation_turns: int = field(default=10, metadata=_doc("Turns of history kept per banking conversation."))
    conversation_ttl_s: float = field(default=1800.0, metadata=_doc("A banking conversation idle this long is forgotten."))
    # --- key reload, conversation budgets (issue 11) ------------------------------------------
    keys_reload_file: Path | None = field(default=None, metadata=_doc(
        "A fresher copy of the keys file, read instead of it when present (the unit sets it: `systemctl reload` "
        "copies the key store there, as systemd 252 (Debian 12) does not refresh LoadCredential= on reload)."))
    run_dir: Path | None = field(default=None, metadata=_doc(
        "Where `bankllm serve` records its pid and the keys it has in force, so `bankllm keys create/revoke` can make "
        "it reload and confirm; default: $RUNTIME_DIRECTORY under systemd, else <data_dir>/run."))
    # --- served adapters (issue 13): where adapters added at run time are kept --------------------------
    state_dir: Path | None = field(default=None, metadata=_doc(
        "Where the service keeps adapters added at run time (adapters/ and adapters.json), so a restart keeps the "
        "set; default: $STATE_DIRECTORY under systemd (StateDirectory=), else <data_dir>/state."))
    conversation_max_total: int = field(default=10000, metadata=_doc(
        "Most banking conversations kept in memory; at the cap the key holding the most loses its oldest."))
    conversation_max_per_key: int = field(default=1000, metadata=_doc(
        "Most banking conversations one API key keeps; its next new one evicts its own oldest, never another key's."))
    system_prompt: str = field(default=(
        "You are a helpful, precise assistant for a bank's customers and staff. Answer briefly. "
        "Never ask for or repeat full card numbers, PINs or passwords."), metadata=_doc(
        "System prompt of the banking chat endpoint and the Modelfile."))

    # --- banking assistant (/api/v1/chat) ----------------------------------------------------
    chat_mode: str = field(default="approved", metadata=_doc(
        "How /api/v1/chat answers: 'approved' (the bank's approved answer for the recognised intent, a clarifying "
        "question when unsure, a handoff when out of scope) or 'generative' (the model writes the answer, given the "
        "approved answer as its reference; opt-in)."))
    answers_file: Path | None = field(default=None, metadata=_doc(
        "The approved-answer library (TOML; check it with `bankllm answers check`). Default: the build's "
        "answers.toml, else the shipped default library."))
    bank_facts: dict = field(default_factory=dict, metadata=_doc(
        "Values of the answer library's placeholders (bank_name, support_phone, ...): a [bank_facts] table in the "
        "config file, or BANKLLM_BANK_FACTS as a JSON object."))
    answer_threshold: float | None = field(default=None, metadata=_doc(
        "Calibrated confidence at or above which the assistant answers (default: the threshold stored in the build, "
        "chosen on validation data for target_answered_accuracy)."))
    target_answered_accuracy: float = field(default=0.98, metadata=_doc(
        "Accuracy the answered share must reach on validation data; `bankllm eval --fit` picks the threshold for it."))
    clarify_mass: float = field(default=0.75, metadata=_doc(
        "Below the threshold, ask a clarifying question when the two or three likeliest intents hold at least this "
        "much probability together; otherwise hand over."))

    # --- signatures (appliance/signing.py; issue 11, finding 4) ---------------------------------------
    trust_key: Path | None = field(default=None, metadata=_doc(
        "The bank's ed25519 public key (PEM). When set, `bankllm serve` verifies the build directory's signature "
        "(bankllm-build.sig) at start and refuses to start if a file is missing, added or changed or the signature "
        "is bad; `bankllm install` checks bundles and builds with it. `bankllm install --trust KEY` sets it."))

    # --- install -----------------------------------------------------------------------------
    allowed_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"], metadata=_doc(
        "Client networks the systemd unit lets reach the service (IPAddressAllow)."))
    install_python: Path = field(default=Path("/usr/bin/python3"), metadata=_doc(
        "Python that the installed service's virtual environment is made from (must live outside /root and /home)."))
    install_ready_timeout_s: float = field(default=180.0, metadata=_doc(
        "How long `bankllm install` waits for the started service's /ready before rolling back."))

    # --- TLS and safe serving (issue 11: TLS/mTLS, unsafe settings) ---------------------------
    tls_cert: Path | None = field(default=None, metadata=_doc(
        "PEM certificate to serve HTTPS with (the server's certificate first, then its intermediates); unset = plain "
        "HTTP. `bankllm install` hands the service a 0600 copy as a systemd credential."))
    tls_key: Path | None = field(default=None, metadata=_doc(
        "Unencrypted PEM private key of tls_cert (required with it); `bankllm install` copies it 0600 into the "
        "credentials directory."))
    tls_client_ca: Path | None = field(default=None, metadata=_doc(
        "PEM CA certificate(s) of the bank's client certificates: a client certificate that is sent must chain to "
        "one of them."))
    require_client_cert: bool = field(default=False, metadata=_doc(
        "Mutual TLS: refuse every connection without a client certificate signed by tls_client_ca."))
    # --- shared state of a fleet (issue 12: conversations and rate limits in Redis/Valkey) -------
    state_backend: str = field(default="memory", metadata=_doc(
        "Where conversation history and per-key rate limits live: 'memory' (this process; one machine) or "
        "'redis' (a Redis/Valkey server every node of a fleet shares)."))
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_doc(
        "Redis/Valkey address for state_backend = 'redis': redis://host:port/db, or rediss:// for TLS; no password "
        "in it (use redis_password_file)."))
    redis_username: str | None = field(default=None, metadata=_doc("Redis ACL user name (default: the default user)."))
    redis_password_file: Path | None = field(default=None, metadata=_doc(
        "File holding the Redis password (a secret: never put it in the TOML); under systemd it is handed over with "
        "LoadCredential=redis-password."))
    redis_tls_ca: Path | None = field(default=None, metadata=_doc(
        "PEM CA that signs the Redis server's certificate (rediss://; default: the system's CAs)."))
    redis_key_prefix: str = field(default="bankllm:", metadata=_doc(
        "Prefix of every Redis key this service writes (one prefix per fleet sharing a Redis)."))
    redis_timeout_s: float = field(default=1.0, metadata=_doc(
        "Connect and socket timeout of each Redis call (one retry): a Redis that hangs gives 503 after at most twice "
        "this, one that refuses at once."))
    unsafe_serve_as_root: bool = field(default=False, metadata=_doc(
        "Let `bankllm serve` run as root outside systemd (only for a container or test whose root is already "
        "confined); otherwise serve as the service user (`bankllm serve --as-user bankllm`) or under the unit."))

    @classmethod
    def load(cls, config: Path | None = None, env: typing.Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from defaults, a TOML file, BANKLLM_* variables, then explicit overrides (None = unset)."""
        return cls.resolve(config, env, **overrides)[0]

    @classmethod
    def resolve(cls, config: Path | None = None, env: typing.Mapping[str, str] | None = None,
                **overrides) -> tuple["Settings", dict[str, str]]:
        """`load`, plus where each value came from: default, config file PATH, environment BANKLLM_X, or flag."""
        env = os.environ if env is None else env
        values: dict[str, typing.Any] = {}
        sources: dict[str, str] = {}
        if config is None and env.get(ENV_PREFIX + "CONFIG"):
            config = Path(env[ENV_PREFIX + "CONFIG"])
        names = [f.name for f in dataclasses.fields(cls)]
        if config is not None:
            from_file = read_toml(Path(config))
            check_keys(from_file, f"configuration file {config}")
            values.update(from_file)
            sources.update({k: f"config file {config}" for k in from_file})
        for name in names:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name], sources[name] = raw, f"environment {ENV_PREFIX}{name.upper()}"
        for key, value in overrides.items():
            if key not in names:
                check_keys({key: value}, "flags")
            if value is not None:
                values[key], sources[key] = value, "flag"
        hints = typing.get_type_hints(cls)
        kwargs = {name: _coerce(name, hints[name], value) for name, value in values.items()}
        settings = cls(**kwargs)
        settings.validate(env)
        return settings, {name: sources.get(name, "default") for name in names}

    def validate(self, env: typing.Mapping[str, str] | None = None) -> None:
        if not (0 < self.gate_ship_below <= self.gate_warn_below <= self.gate_escalate_below):
            raise ConfigError("gate thresholds must satisfy 0 < ship <= warn <= escalate",
                              "set gate_ship_below, gate_warn_below, gate_escalate_below in increasing order")
        if self.gate_n_ctx < 16:
            raise ConfigError(f"gate_n_ctx={self.gate_n_ctx} is too small", "use at least 16 (512 is the default)")
        if self.decode_lanes not in (1, 2):
            raise ConfigError(f"decode_lanes={self.decode_lanes} is not 1 or 2", "set decode_lanes to 1 or 2")
        if self.gpu_layers < -1:
            raise ConfigError(f"gpu_layers={self.gpu_layers} is not a layer count", "use 0 (CPU), N layers, or -1 (all)")
        if self.chat_mode not in ("approved", "generative"):
            raise ConfigError(f"chat_mode={self.chat_mode!r} is not a mode", "set chat_mode to 'approved' or 'generative'")
        if self.answer_threshold is not None and not (0.0 <= self.answer_threshold <= 1.0):
            raise ConfigError(f"answer_threshold={self.answer_threshold} is not a probability", "use a value in [0, 1]")
        if not (0.5 <= self.target_answered_accuracy < 1.0):
            raise ConfigError(f"target_answered_accuracy={self.target_answered_accuracy} is out of range",
                              "use a value in [0.5, 1), e.g. 0.98")
        if self.exemplars_per_label < 0:
            raise ConfigError(f"exemplars_per_label={self.exemplars_per_label} is negative",
                              "use 0 (all of them) or a positive count")
        if not (0.0 < self.clarify_mass <= 1.0):
            raise ConfigError(f"clarify_mass={self.clarify_mass} is out of range", "use a value in (0, 1]")
        for name in ("fetch_timeout_s", "fetch_max_bytes", "adapter_archive_max_bytes", "adapter_archive_max_members",
                     "bundle_max_bytes", "bundle_max_members"):  # intake limits (issue 11)
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive", f"set {name} above 0")
        if self.conversation_max_total < 1 or self.conversation_max_per_key < 1:
            raise ConfigError("conversation_max_total and conversation_max_per_key must be at least 1",
                              "set them to positive numbers (defaults 10000 and 1000)")
        if self.state_backend not in ("memory", "redis"):  # shared state (issue 12)
            raise ConfigError(f"state_backend={self.state_backend!r} is not a backend",
                              "set state_backend to 'memory' (one machine) or 'redis' (a fleet)")
        if self.state_backend == "redis":
            from .service.state import check_redis_settings

            check_redis_settings(self)
        if not (0 < self.port < 65536):
            raise ConfigError(f"port {self.port} is out of range", "use a port between 1 and 65535")
        self._validate_serving(env)

    def _validate_serving(self, env: typing.Mapping[str, str] | None) -> None:
        """Refuse unsafe binds (issue 11) and TLS files that are missing, unreadable, unparsable or do not match."""
        if not self.host.strip() or self.host != self.host.strip():
            raise ConfigError(f"host = {self.host!r} is empty or padded (an empty host binds every interface)",
                              'set host = "127.0.0.1" (this machine only), or host = "0.0.0.0" to listen on every '
                              "interface on purpose")
        if not self.require_keys and not is_loopback(self.host):
            raise ConfigError(f"require_keys = false on host = {self.host!r}: anyone who reaches that address could "
                              "use the API without a key",
                              'set require_keys = true (keys: `bankllm keys create`) or bind host = "127.0.0.1"')
        tls_options = {"tls_key": self.tls_key, "tls_client_ca": self.tls_client_ca,
                       "require_client_cert": self.require_client_cert or None}
        if self.tls_cert is None:
            given = [name for name, value in tls_options.items() if value is not None]
            if given:
                raise ConfigError(f"{given[0]} is set but tls_cert is not", "set tls_cert (and tls_key) to serve "
                                  f"HTTPS, or remove {given[0]}")
            return
        if self.tls_key is None:
            raise ConfigError("tls_cert is set but tls_key is not", "set tls_key to the certificate's private key")
        if self.require_client_cert and self.tls_client_ca is None:
            raise ConfigError("require_client_cert = true needs tls_client_ca",
                              "set tls_client_ca to the PEM CA that signs the bank's client certificates")
        from .service.tls import check_files

        check_files(self.resolved_tls_files(env))

    def resolved_tls_files(self, env: typing.Mapping[str, str] | None = None) -> dict[str, Path]:
        """The TLS files as this process reads them: the systemd credential copy (tls-cert, ...) where there is one."""
        env = os.environ if env is None else env
        creds = env.get("CREDENTIALS_DIRECTORY")
        files = {}
        for name in TLS_CREDENTIALS:
            path = getattr(self, name)
            if path is None:
                continue
            copy = Path(creds) / TLS_CREDENTIALS[name] if creds else None
            files[name] = copy if copy is not None and copy.is_file() else path
        return files

    def resolved_redis_files(self, env: typing.Mapping[str, str] | None = None) -> dict[str, Path]:
        """The Redis password file and CA as this process reads them: the systemd credential copy where there is one."""
        env = os.environ if env is None else env
        creds = env.get("CREDENTIALS_DIRECTORY")
        files = {}
        for name, cred in REDIS_CREDENTIALS.items():
            path = getattr(self, name)
            if path is not None:
                copy = Path(creds) / cred if creds else None
                files[name] = copy if copy is not None and copy.is_file() else path
        return files

    def resolved_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)))

    def resolved_keys_file(self, env: typing.Mapping[str, str] | None = None) -> Path:
        """The API key file: keys_file, else $CREDENTIALS_DIRECTORY/api-keys (systemd), else <config dir>/api-keys."""
        if self.keys_file is not None:
            return self.keys_file
        env = os.environ if env is None else env
        if env.get("CREDENTIALS_DIRECTORY"):
            return Path(env["CREDENTIALS_DIRECTORY"]) / "api-keys"
        return default_config_dir() / "api-keys"

    def resolved_run_dir(self, env: typing.Mapping[str, str] | None = None) -> Path:
        """run_dir, else $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else <data_dir>/run."""
        return _systemd_dir(self.run_dir, "RUNTIME_DIRECTORY", env, self.data_dir / "run")

    def resolved_state_dir(self, env: typing.Mapping[str, str] | None = None) -> Path:
        """state_dir, else $STATE_DIRECTORY (systemd's StateDirectory=), else <data_dir>/state."""
        return _systemd_dir(self.state_dir, "STATE_DIRECTORY", env, self.data_dir / "state")

    @classmethod
    def explain(cls, config: Path | None = None, env: typing.Mapping[str, str] | None = None,
                **overrides) -> list[tuple[str, typing.Any, str, str]]:
        """(name, effective value, where it came from, description) for every setting."""
        settings, sources = cls.resolve(config, env, **overrides)
        return [(f.name, getattr(settings, f.name), sources[f.name], f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(name, default, description) for every setting."""
        rows = []
        for f in dataclasses.fields(Settings):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f.name, repr(default), f.metadata.get("help", "")))
        return rows


# Redis secret/CA settings and their systemd credentials (issue 12): copied 0600 by the installer like the TLS files.
REDIS_CREDENTIALS = {"redis_password_file": "redis-password", "redis_tls_ca": "redis-ca"}


# TLS settings and the name of the systemd credential (LoadCredential=) that carries each file to the service.
TLS_CREDENTIALS = {"tls_cert": "tls-cert", "tls_key": "tls-key", "tls_client_ca": "tls-client-ca"}


def _systemd_dir(explicit: Path | None, variable: str, env: typing.Mapping[str, str] | None, default: Path) -> Path:
    """`explicit` if set, else the first directory systemd names in `variable` (RuntimeDirectory=,
    StateDirectory=...), else `default`."""
    env = os.environ if env is None else env
    if explicit is not None:
        return explicit
    if env.get(variable):
        return Path(env[variable].split(":")[0])
    return default


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def under_systemd(env: typing.Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by a systemd manager (which sets INVOCATION_ID for every unit it runs)."""
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID"))


def check_keys(data: typing.Mapping[str, typing.Any], where: str) -> None:
    """Refuse a key that is not a setting, naming the closest one (a misspelt key must not be silently ignored)."""
    names = [f.name for f in dataclasses.fields(Settings)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else "remove it; "
            raise ConfigError(f"unknown setting {key!r} in {where}", hint + "`bankllm settings` lists every setting")


def env_flag(name: str, env: typing.Mapping[str, str] | None = None) -> str | None:
    """Read one BANKLLM_* variable (for the few things needed before Settings exist, like BANKLLM_DEBUG)."""
    env = os.environ if env is None else env
    return env.get(ENV_PREFIX + name)


def read_toml(path: Path, missing_ok: bool = False) -> dict:
    """A bankllm TOML file's settings (flat, or under one [bankllm] table); {} for a missing file with `missing_ok`."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(f"configuration file {path} does not exist", "create it or drop --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}", "fix the syntax") from None
    if isinstance(data.get("bankllm"), dict):
        outside = [k for k in data if k != "bankllm"]
        if outside:
            raise ConfigError(f"configuration file {path} has {outside[0]!r} outside its [bankllm] table",
                              "put every setting under [bankllm], or use no table at all")
        return data["bankllm"]
    return data


def toml_value(value) -> str:
    """One value as TOML: booleans, numbers, lists, tables (inline), everything else (paths too) as a basic string."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_toml(values: typing.Mapping[str, typing.Any], comments: typing.Iterable[str] = ()) -> str:
    """A flat settings file that `read_toml` reads back: comment lines, then `key = value` (None left out)."""
    lines = [f"# {c}" for c in comments]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _coerce(name: str, hint, value):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if value is None or value == "":
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is Path:
            return Path(value).expanduser()
        if origin is dict or hint is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): str(v) for k, v in value.items()}
        if origin is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if hint is str and isinstance(value, (dict, list)):
            raise ValueError(value)  # a table or array where text is expected is a mistake, not a string
        return str(value) if hint is str else value
    except (TypeError, ValueError):  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"setting {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}",
                          f"set {ENV_PREFIX}{name.upper()} or `{name}` in the config file to a valid value") from None
