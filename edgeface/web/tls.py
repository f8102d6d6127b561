"""A self-signed certificate for `web.tls: true`, generated once into state_dir/web-tls/ (cryptography)."""
from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from edgeface.security import ensure_private_dir, write_private_atomic


def ensure_certificate(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem): made on first use, an EC P-256 key, valid 10 years, for this host's name and IPs."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ensure_private_dir(folder)
    host = socket.gethostname()
    names: list[x509.GeneralName] = [x509.DNSName(host), x509.DNSName(f"{host}.local"), x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        for info in socket.getaddrinfo(host, None, socket.AF_INET):
            ip = ipaddress.ip_address(info[4][0])
            if x509.IPAddress(ip) not in names:
                names.append(x509.IPAddress(ip))
    except OSError:
        pass
    pk = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeface {host}")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(pk.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .sign(pk, hashes.SHA256()))
    write_private_atomic(key, pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    write_private_atomic(cert, certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key
