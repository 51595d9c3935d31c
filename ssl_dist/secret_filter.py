"""What looks like a secret, in what a job sends to a cluster: its environment variables
(`ssl-dist submit --env`) and its files (the job's working_dir, the cluster launcher's sync).

Still deny-lists, but of the shapes secrets take: a name that says it holds one, a value that
is one (a cloud key id, a URL with a password, a private key, a token with a known prefix, a
long random string), a file or folder where they are kept. What matches is never sent.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from pathlib import PurePosixPath

# Environment variable names that hold secrets, whatever their value.
SECRET_NAME = re.compile(r"PASS(WORD|WD|PHRASE)?($|_)|PWD($|_)|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE|SESSION|AUTH|"
                         r"COOKIE", re.I)

# Values that are secrets, whatever their name: (what it is, pattern).
SECRET_VALUES = (
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a URL with a password", re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.I)),
    ("a private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")),
    ("an API token", re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{20,}|glpat-[\w-]{20,}|"
                                r"xox[abprs]-[\w-]{10,}|sk-[\w-]{20,}|hf_[A-Za-z0-9]{30,}|AIza[\w-]{35})")),
)

# A long run of key-like characters with the entropy of random bytes (an AWS secret key has ~5
# bits a character; hex digests, UUIDs and paths stay below): a secret without a known shape.
RANDOM_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
RANDOM_BITS_PER_CHAR = 4.5

# Files and folders that hold secrets: never uploaded with a job or synced to a node, even when
# git tracks them. Matched (case-insensitively) against each file's name and each folder on its
# path; written as gitignore / rsync patterns (no slash: any depth).
SECRET_FILE_PATTERNS = (
    ".env", ".env.*", "*.env", ".envrc", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key",
    "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", ".netrc", "_netrc", ".pgpass", ".git-credentials",
    ".pypirc", ".npmrc", ".htpasswd", "kubeconfig*", "*.kubeconfig", "*.tfstate", "*.tfstate.*", "*.tfvars",
    "credentials*", "client_secret*.json", "service-account*.json", "secrets.json", "secrets.y*ml",
    "secrets.toml", "auth_token",
)
SECRET_DIR_NAMES = (".aws", ".ssh", ".gnupg", ".kube", ".docker", ".azure", ".gcloud", ".ray", ".terraform")


def _bits_per_char(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def secret_env_reason(name: str, value: str) -> str | None:
    """Why `name=value` looks like a secret ("its name says so", "its value is a private key"),
    or None. The value itself never appears in the answer."""
    if SECRET_NAME.search(name):
        return "its name says it holds a secret"
    for what, pattern in SECRET_VALUES:
        if pattern.search(value):
            return f"its value is {what}"
    if any(_bits_per_char(run) >= RANDOM_BITS_PER_CHAR for run in RANDOM_RUN.findall(value)):
        return "its value looks like a random key"
    return None


def secret_file_pattern(relpath: str) -> str | None:
    """The pattern a project file (a path relative to the project, with /) matches as a likely
    secret, e.g. "id_rsa*" for "deploy/id_rsa.pub" or ".ssh/" for ".ssh/known_hosts"; else None."""
    *folders, name = PurePosixPath(relpath.lower()).parts
    for folder in folders:
        if folder in SECRET_DIR_NAMES:
            return f"{folder}/"
    return next((p for p in SECRET_FILE_PATTERNS if fnmatch.fnmatchcase(name, p)), None)


def rsync_excludes() -> list[str]:
    """The secret patterns as rsync --exclude patterns (what the cluster launcher YAML lists)."""
    return [*SECRET_FILE_PATTERNS, *(f"{d}/" for d in SECRET_DIR_NAMES)]
