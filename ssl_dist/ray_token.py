"""Ray token authentication for a Ray cluster this process starts itself (a laptop run).

A local Ray listens on the machine's address, not only on loopback: without a token anyone on
the network can submit work to it, i.e. run code as this user. So a local cluster starts in
Ray's token mode unless the user chose otherwise (RAY_AUTH_MODE set: the tests set `disabled`,
explicitly). The token is the one Ray itself reads, in Ray's order: RAY_AUTH_TOKEN (the token
itself), else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. It is generated once, 256
random bits as `ray get-auth-token --generate` makes it, but readable by the user only (Ray's
own generator writes a world-readable file). No Ray import here: this runs before `ray.init`.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

MODE = "RAY_AUTH_MODE"


def token_file(environ=os.environ) -> Path | None:
    """The file Ray reads its token from, or None when RAY_AUTH_TOKEN holds the token itself."""
    if environ.get("RAY_AUTH_TOKEN"):
        return None
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
    return Path.home() / ".ray" / "auth_token"


def ensure_token(path: Path) -> Path:
    """Make `path` hold a token readable by its owner only: generated if missing, kept (with
    its permissions tightened to 0600, and said so) if there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        # Written beside, then linked into place: never a half-written token under its name,
        # and a second process starting at the same moment keeps the first one's token.
        spare = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            os.link(spare, path)
        except FileExistsError:
            pass
        finally:
            spare.unlink(missing_ok=True)
        print(f"ssl-dist: generated Ray's authentication token in {path} (readable by you only); "
              f"`ray get-auth-token` prints it", file=sys.stderr)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)
        print(f"ssl-dist: {path} (Ray's authentication token) was readable by others; it is now "
              f"readable by you only", file=sys.stderr)
    return path


def local_auth_mode(environ=os.environ) -> str:
    """RAY_AUTH_MODE for a Ray cluster started here: the user's own setting if there is one,
    else "token", written into `environ` so Ray's processes inherit it. In token mode the token
    Ray will read is made ready (see `ensure_token`)."""
    mode = environ.get(MODE)
    if mode is None:
        mode = environ[MODE] = "token"
    if mode.lower() == "token":
        path = token_file(environ)
        if path is not None:
            ensure_token(path)
    return mode
