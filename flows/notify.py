"""Notifications: a log line always, and a JSON POST to a webhook when one is configured
(``notifications.webhook_url`` in graft.yaml, or ``GRAFT_WEBHOOK_URL``). A webhook that
fails is logged and never fails the run."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

from flows.config import read_config

log = logging.getLogger("graft.notify")


def webhook_url(root: Path) -> str | None:
    return os.environ.get("GRAFT_WEBHOOK_URL") or (read_config(root).get("notifications", {}) or {}).get("webhook_url")


def notify(root: Path, event: str, payload: dict[str, Any], logger=None) -> bool:
    """Send ``{"event": event, **payload}``; return True if a webhook accepted it."""
    logger = logger or log
    body = {"event": event, "project": str(root), **payload}
    what = ", ".join(f"{k}={payload[k]}" for k in ("model_name", "version", "stage", "flow_run_name") if payload.get(k))
    level = logging.ERROR if event.endswith("failed") else logging.INFO
    logger.log(level, "graft notification: %s (%s)", event, what or root)
    url = webhook_url(root)
    if not url:
        return False
    request = urllib.request.Request(url, data=json.dumps(body, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "graft"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return 200 <= r.status < 300
    except Exception as e:
        logger.error("graft notification to %s failed: %s", url, e)
        return False
