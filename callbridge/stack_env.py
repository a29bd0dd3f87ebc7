"""The environment a gateway or worker process gets when it runs against the stand-ins.

Shared by `callbridge bench` and the tests, so both start the tiers the same way.
"""

from __future__ import annotations

import os


def stand_in_env(
    redis_url: str,
    prefix: str,
    *,
    account_sid: str,
    auth_token: str,
    vapi_key: str,
    assistant_id: str,
    log_level: str = "INFO",
    log_format: str = "json",
    **extra: object,
) -> dict[str, str]:
    """This process's environment without any real Twilio/Vapi settings, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAPI_", "TWILIO_"))}
    env.update({
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "TWILIO_ACCOUNT_SID": account_sid,
        "TWILIO_AUTH_TOKEN": auth_token,
        "VAPI_API_KEY": vapi_key,
        "VAPI_ASSISTANT_ID": assistant_id,
        "LOG_LEVEL": log_level,
        "LOG_FORMAT": log_format,
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env
