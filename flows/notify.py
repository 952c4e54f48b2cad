"""Notifications: a log line always, and a JSON POST to a webhook when one is configured
(``GRAFT_WEBHOOK_URL``, in the environment or in the git-ignored ``.graft/secrets.yaml``:
the URL of a Slack or Teams webhook is itself the credential, so it never goes into
graft.yaml, and logs show only its host). A webhook that fails is logged and never fails
the run."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

from graft.base import secrets
from graft.base.errors import GraftError, ParamsError
from graft.config import project

log = logging.getLogger("graft.notify")


def webhook_url(root: Path, logger=None) -> str | None:
    try:
        project.load(root)  # refuses a webhook URL written into graft.yaml, saying where it goes
    except (GraftError, ParamsError) as e:  # say so, never fail the run over a notification
        (logger or log).error("%s", e)
    try:
        return secrets.get(root, "GRAFT_WEBHOOK_URL")
    except Exception as e:  # a secrets file others can read: say so, never fail the run
        (logger or log).error("graft notification: %s", e)
        return None


def notify(root: Path, event: str, payload: dict[str, Any], logger=None) -> bool:
    """Send ``{"event": event, **payload}``; return True if a webhook accepted it."""
    logger = logger or log
    body = {"event": event, "project": str(root), **payload}
    what = ", ".join(f"{k}={payload[k]}" for k in ("model_name", "version", "stage", "flow_run_name") if payload.get(k))
    level = logging.ERROR if event.endswith("failed") else logging.INFO
    logger.log(level, "graft notification: %s (%s)", event, what or root)
    url = webhook_url(root, logger)
    if not url:
        return False
    request = urllib.request.Request(url, data=secrets.mask_url(json.dumps(body, default=str)).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "graft"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return 200 <= r.status < 300
    except Exception as e:  # the error text may quote the URL: only its host is shown
        logger.error("graft notification to %s failed: %s", secrets.url_host(url), secrets.redact(str(e), [url]))
        return False
