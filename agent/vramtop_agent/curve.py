"""ZeroMQ CURVE keys for a stream that leaves the machine.

CURVE encrypts the stream and authenticates the agent to the viewer: a viewer
connects only to an agent whose public key it was given, and a subscriber
that does not know that key completes no handshake, so it gets nothing. With
`curve_client_keys`, the agent also authenticates its viewers: only the
listed public keys may subscribe.

Keys are the 40-character Z85 strings of libzmq, kept in ZeroMQ certificate
files (the format of pyzmq's zmq.auth, readable by its tools):

    python -m vramtop_agent.curve keys DIR NAME

writes DIR/NAME.key (the public key: give it to the other side) and
DIR/NAME.key_secret (public + secret key, mode 0600: keep it). A secret key
file that others can read is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

KEY_LEN = 40  # Z85 of 32 bytes


class CurveKeyError(ValueError):
    """A key or key file that cannot be used (the message says why)."""


def _is_z85_key(value) -> bool:
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    return isinstance(value, bytes) and len(value) == KEY_LEN and value.isascii() and b" " not in value


def load_key(value, secret: bool = False) -> bytes:
    """A Z85 key from bytes/str (40 characters) or from a certificate file's path.

    secret=True returns the secret key of a `.key_secret` file; otherwise the
    public key of either file.
    """
    if isinstance(value, (bytes, str)) and _is_z85_key(value) and not os.path.exists(value):
        return value.encode("ascii") if isinstance(value, str) else bytes(value)
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise CurveKeyError("a CURVE key is a 40-character Z85 string or a certificate file, "
                            f"not {type(value).__name__}")
    path = Path(os.fsdecode(value)).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise CurveKeyError(f"cannot read the CURVE key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:
        raise CurveKeyError(f"{path} is not a CURVE certificate file")
    from zmq.auth import load_certificate

    try:
        public, secret_key = load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{path} is not a CURVE certificate file ({exc})") from None
    key = secret_key if secret else public
    if not key:
        raise CurveKeyError(f"{path} holds no {'secret' if secret else 'public'} key"
                            + (" (pass the .key_secret file)" if secret else ""))
    if secret and stat.S_IMODE(st.st_mode) & 0o077:
        raise CurveKeyError(f"{path} holds a secret key but others can read it: chmod 600 {path}")
    if not _is_z85_key(key):
        raise CurveKeyError(f"{path}: the key is not a 40-character Z85 string")
    return key


def load_keypair(value) -> tuple[bytes, bytes]:
    """(public, secret) of a `.key_secret` certificate file."""
    secret = load_key(value, secret=True)
    import zmq

    return zmq.curve_public(secret), secret


def load_public_keys(value) -> set[bytes]:
    """Public keys from a list of keys/files, or from a directory of `*.key` files."""
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(value)):
        files = sorted(Path(value).expanduser().glob("*.key"))
        if not files:
            raise CurveKeyError(f"no *.key files in {value}")
        return {load_key(f) for f in files}
    if isinstance(value, (str, bytes, os.PathLike)):
        return {load_key(value)}
    return {load_key(v) for v in value}


def write_keypair(directory, name: str) -> tuple[Path, Path]:
    """Create NAME.key and NAME.key_secret (0600) in `directory`; refuses to overwrite."""
    import zmq

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = d / f"{name}.key", d / f"{name}.key_secret"
    for path, text in ((sec_path, _cert(public, secret)), (pub_path, _cert(public, None))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if path is sec_path else 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    return pub_path, sec_path


def _cert(public: bytes, secret: bytes | None) -> str:
    lines = ["#   ZeroMQ CURVE " + ("**Secret** Certificate: DO NOT PROVIDE THIS FILE TO OTHER USERS"
                                     if secret else "Public Certificate"),
             "#   written by vramtop_agent.curve", "", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "keys":
        print("usage: python -m vramtop_agent.curve keys DIR NAME", file=sys.stderr)
        return 2
    try:
        pub, sec = write_keypair(argv[1], argv[2])
    except FileExistsError as exc:
        print(f"{exc.filename} exists: not overwriting it", file=sys.stderr)
        return 1
    print(f"public key (give it to the other side): {pub}\nsecret key (keep it, mode 0600):        {sec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
