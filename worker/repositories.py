"""Build contexts named by a Git repository, fetched as the archive of one ref from the Git host.

`https://[user[:token]@]github.com/OWNER/REPO[.git][/tree/REF | /commit/SHA]` (REF defaults to `main`)
is fetched, as the seed does, from the first of these that exists under the worker's
`--git-archive-base` (GitHub's, `https://github.com`, by default; a GitHub Enterprise or any Git
host serving archives the same way otherwise): `OWNER/REPO/archive/refs/heads/REF.zip`,
`OWNER/REPO/archive/REF.zip` (tags, commits), and for `main` also
`OWNER/REPO/archive/refs/heads/master.zip`. A URL of that shape on the base's own host is a
repository too; a URL ending in `.zip`, `.tar.gz` or `.tgz` is an archive, used as it is.

Credentials in the URL are sent as HTTP Basic authentication to the Git host only (httpx drops them
on a redirect to another origin) and are never part of a URL this module requests, logs or names
in an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx

from jobwire.core import egress
from jobwire.core.definition import without_credentials
from jobwire.worker.errors import BuildError

GITHUB = "https://github.com"
_TRIES = 3
_READ_TIMEOUT = 60.0
_REPOSITORY = re.compile(
    r"^https?://(?:(?P<userinfo>[^/?#@]*)@)?(?P<host>[^/?#@]+)/(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+?)"
    r"(?:\.git)?(?:/(?:tree|commit)/(?P<ref>[^?#]+?))?/?$"
)
_REF = re.compile(r"^[A-Za-z0-9._/+-]{1,255}$")
_ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Repository:
    """One ref of a repository on a Git host, and the credentials to fetch it with."""

    owner: str
    name: str
    ref: str
    auth: httpx.BasicAuth | None

    def archives(self, base: str) -> list[str]:
        """The archive URLs to try, in the seed's order."""
        root = f"{base.rstrip('/')}/{self.owner}/{self.name}/archive"
        urls = [f"{root}/refs/heads/{self.ref}.zip", f"{root}/{self.ref}.zip"]
        if self.ref == "main":
            urls.append(f"{root}/refs/heads/master.zip")
        return urls

    def __str__(self) -> str:
        return f"{self.owner}/{self.name} at {self.ref}"


def repository(url: str, base: str = GITHUB) -> Repository | None:
    """The repository ref `url` names (on github.com or on `base`'s host); None for any other URL.
    Raises BuildError for a repository URL whose ref cannot be fetched (a template left unfilled)."""
    match = _REPOSITORY.match(url)
    if match is None or url.lower().endswith(_ARCHIVE_SUFFIXES) or match["name"] in (".", ".."):
        return None
    host = match["host"].lower()
    if host not in ("github.com", "www.github.com", httpx.URL(base).netloc.decode().lower()):
        return None
    ref = unquote(match["ref"] or "main")
    if not _REF.match(ref) or ".." in ref.split("/") or ref.startswith("${"):
        raise BuildError(f"the build context {without_credentials(url)} names no usable Git ref: {ref!r}")
    return Repository(match["owner"], match["name"], ref, _auth(match["userinfo"]))


def _auth(userinfo: str | None) -> httpx.BasicAuth | None:
    if not userinfo:
        return None
    user, _, password = userinfo.partition(":")
    return httpx.BasicAuth(unquote(user), unquote(password))


def credentials_only(url: str) -> tuple[str, httpx.BasicAuth | None]:
    """`url` without its credentials, and them as HTTP Basic authentication (None without any)."""
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*)@", url)
    return without_credentials(url), _auth(match[1]) if match else None


async def download(
    urls: list[str],
    auth: httpx.BasicAuth | None,
    destination: Path,
    *,
    policy: egress.Policy,
    max_bytes: int,
    log: Callable[[str], object],
) -> str:
    """Fetch the first of `urls` that exists (404: try the next) into `destination`; returns it.
    Errors name the URLs, which hold no credentials."""
    async with egress.client(policy, _READ_TIMEOUT) as client:
        for url in urls:
            if await _fetch(client, url, auth, destination, max_bytes):
                return url
            log(f"not found: {url}\n")
    raise BuildError(f"no build context archive found; tried {', '.join(urls)}")


async def _fetch(
    client: httpx.AsyncClient, url: str, auth: httpx.BasicAuth | None, destination: Path, max_bytes: int
) -> bool:
    """True once `url` is written to `destination`; False when the host answers 404."""
    for attempt in range(_TRIES):
        try:
            return await _get(client, url, auth, destination, max_bytes)
        except egress.EgressRefused as error:
            raise BuildError(f"download of {url} refused: {error}") from None
        except httpx.TransportError as error:
            if attempt == _TRIES - 1:
                raise BuildError(f"download of {url} failed: {type(error).__name__}") from None
    return False


async def _get(client: httpx.AsyncClient, url: str, auth: httpx.BasicAuth | None, destination: Path, most: int) -> bool:
    headers = {"accept-encoding": "identity"}
    async with client.stream("GET", url, auth=auth or httpx.USE_CLIENT_DEFAULT, headers=headers) as response:
        if response.status_code == 404:
            return False
        if not response.is_success:
            raise BuildError(f"download of {url} failed: HTTP {response.status_code} {response.reason_phrase}")
        too_big = BuildError(f"the build context at {url} is larger than {most} bytes (--max-download-size)")
        if int(response.headers.get("content-length") or 0) > most:
            raise too_big
        written = 0
        with destination.open("wb") as handle:
            async for block in response.aiter_bytes():
                written += len(block)
                if written > most:
                    raise too_big
                handle.write(block)
    return True
