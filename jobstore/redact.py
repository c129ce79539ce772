"""Keep the server's file system out of what clients read.

Error messages often carry paths: an ``OSError`` names its file, a library names the folder
it could not parse. A client needs to know *what* failed (the model, its ``config.json``),
not where the server keeps it. :func:`redact_paths` rewrites every path under a known server
location to a label (``<data>/files/...``, ``<models>/tiny/config.json``, ``<server>/...``);
the worker applies it before a job's error reaches the store, the service before any error
body leaves. The full text stays in the server's log. :func:`redact_url` does the same for a
database URL's password (``MM_DATABASE_URL`` in an error message).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

def server_locations(data_dir: Path | None, model_roots: Iterable[Path] = ()) -> list[tuple[str, str]]:
    """``(prefix, label)`` pairs, longest prefix first (so the most specific label wins)."""
    pairs: list[tuple[str, str]] = []
    if data_dir is not None:
        pairs.append((str(Path(data_dir).resolve()), "<data>"))
        pairs.append((str(Path(data_dir).absolute()), "<data>"))
    for root in model_roots:
        pairs += [(str(Path(root).resolve()), "<models>"), (str(Path(root).absolute()), "<models>")]
    others = {tempfile.gettempdir(), str(Path.home()), sys.prefix, sys.base_prefix, os.getcwd(), str(Path(__file__).resolve().parents[1])}
    pairs += [(str(Path(p).resolve()), "<server>") for p in others if p and p != os.sep]
    unique = {prefix.rstrip(os.sep): label for prefix, label in reversed(pairs) if prefix.rstrip(os.sep)}
    return sorted(unique.items(), key=lambda item: len(item[0]), reverse=True)


def redact_paths(text: str, locations: list[tuple[str, str]]) -> str:
    """``text`` with every path under one of ``locations`` replaced by its label."""
    for prefix, label in locations:
        # the prefix, then the end of a path component: "/data" must not match "/database"
        text = re.sub(re.escape(prefix) + r"(?=$|[/\s'\"):,;\]])", label, text)
    return text


#: ``scheme://user:password@``: the user part with a password (the last ``@`` before the path ends it).
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):[^/?#]*@")
_PASSWORD_PARAM = re.compile(r"(?i)(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^&\s]*)")


def redact_url(url: str) -> str:
    """A database URL (or ``key=value`` connection string) fit for a message or a log: its
    password, in the user part or as a ``password=`` parameter, replaced by ``***``."""
    url = _URL_PASSWORD.sub(r"\g<head>:***@", url, count=1)
    return _PASSWORD_PARAM.sub(r"\g<key>***", url)


def redact_url_secrets(text: str, url: str) -> str:
    """``text`` (a driver's error about ``url``) with ``url``'s passwords, wherever they appear, as ``***``."""
    secrets = [m.group(0)[len(m["head"]) + 1 : -1] for m in _URL_PASSWORD.finditer(url)]
    secrets += [m["value"].strip("'") for m in _PASSWORD_PARAM.finditer(url)]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return redact_url(text)
