"""Per-run SSH keys: the client key dynamem logs in with and the guest's host key.

Both are made fresh for each booted VM and handed to the guest through fw_cfg, so the host
knows the guest's public host key before it connects and can pin it (no trust on first use).
A VM started from a saved state (dynamem.qemu.snapshot) uses the keys its guest read when
that state's boot happened, saved with it; every cell of that state shares them.
"""

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class KeyPair:
    private: Path  # OpenSSH PEM, mode 0600
    public: Path  # "ssh-ed25519 AAAA..."

    @classmethod
    def at(cls, directory: Path, name: str) -> "KeyPair":
        """A pair made earlier (a saved state's keys)."""
        return cls(directory / name, directory / f"{name}.pub")

    @property
    def public_line(self) -> str:
        return self.public.read_text().strip()


def make_keypair(directory: Path, name: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = directory / name
    public = directory / f"{name}.pub"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd_path = private
    fd_path.touch(mode=0o600)
    fd_path.write_bytes(pem)
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public.write_bytes(public_bytes + b"\n")
    return KeyPair(private, public)
