"""The OCI distribution API, as a small client: manifests and blobs of one registry.

* Auth: a 401 names the scheme. `Bearer realm=...,service=...,scope=...`
  fetches a token (with the registry's credentials, if any, as basic auth)
  per repository scope and retries; `Basic` sends the credentials. Tokens
  are kept for the life of the client.
* Transport: HTTPS; plain HTTP only for insecure registries (localhost, or
  named with --insecure-registry), which are tried with HTTPS first, as
  Docker does.
* Retries: dropped connections, timeouts, 429 and 5xx are retried three
  times with growing pauses; anything else (a refused connection, an
  unknown host, a 4xx) is an error at once.
* Every error becomes a RegistryError naming the registry, the repository
  and what was being done.

httpx is imported here only, and this module only when a registry is used.
"""

from __future__ import annotations

import re
import threading
import time

import httpx

from ..errors import RegistryError
from . import auth

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_RETRY_STATUS = {429, 500, 502, 503, 504}
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def is_insecure(registry: str, insecure: tuple[str, ...] = ()) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.startswith("[") else registry.split("]")[0] + "]"
    return registry in insecure or host in insecure or host in LOCAL_HOSTS or \
        host.startswith("127.")


class Client:
    """One registry. Thread-safe: parallel blob transfers share it."""

    def __init__(self, registry: str, *, insecure: tuple[str, ...] = (), timeout: float = 60,
                 credentials: tuple[str, str] | None = None):
        self.registry = registry
        self._credentials = credentials      # given (pybuild login), else looked up when asked
        self.host = "registry-1.docker.io" if registry == "docker.io" else registry
        self.insecure = is_insecure(registry, insecure)
        self.scheme = "https"
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10), follow_redirects=True)
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._lock = threading.Lock()
        self._scheme_known = not self.insecure

    def close(self) -> None:
        self.http.close()

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{path}"

    # ---- requests with auth and retries ----------------------------------------------

    def request(self, method: str, path_or_url: str, *, scope: str, what: str, ok=(200,),
                headers: dict | None = None, content=None, stream: bool = False,
                params: dict | None = None) -> httpx.Response:
        """One call to the registry; raises RegistryError unless the status is in `ok`."""
        self._pick_scheme()
        url = httpx.URL(path_or_url if "://" in path_or_url else self.url(path_or_url))
        if params:       # (added to an upload location's own query, which httpx would replace)
            url, params = url.copy_merge_params(params), None
        delay = 0.5
        for attempt in range(4):
            req_headers = dict(headers or {})
            self._authorize(req_headers, scope)
            try:
                request = self.http.build_request(method, url, headers=req_headers, content=content,
                                                  params=params)
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as e:
                # A dropped connection or a timeout is worth another try; a refused
                # connection or an unknown host is not.
                if attempt == 3 or not _rewindable(content) or isinstance(e, httpx.ConnectError):
                    raise RegistryError(f"{self.registry}: {what}: {e or type(e).__name__}",
                                        hint="check that the registry is reachable") from None
                time.sleep(delay)
                delay *= 2
                continue
            if response.status_code == 401 and attempt < 3:
                response.read()
                self._authenticate(response, scope, what, req_headers.get("Authorization"))
                continue
            if response.status_code in _RETRY_STATUS and attempt < 3 and _rewindable(content):
                response.close()
                time.sleep(delay)
                delay *= 2
                continue
            if response.status_code not in ok:
                if stream:
                    response.read()
                raise _error(self.registry, what, response)
            return response
        raise RegistryError(f"{self.registry}: {what}: gave up after retries")

    def _pick_scheme(self) -> None:
        if self._scheme_known:
            return
        with self._lock:
            if self._scheme_known:
                return
            try:
                self.http.get(f"https://{self.host}/v2/", timeout=5)
                self.scheme = "https"
            except httpx.TransportError:
                self.scheme = "http"      # an insecure registry (localhost, or named so)
            self._scheme_known = True

    def _authorize(self, headers: dict, scope: str) -> None:
        token = self._tokens.get(scope) or self._tokens.get("*")
        if token:
            headers["Authorization"] = token

    def _authenticate(self, response: httpx.Response, scope: str, what: str,
                      sent: str | None) -> None:
        """Get what the 401 asks for (`sent`: the Authorization that was refused, if any)."""
        with self._lock:
            current = self._tokens.get(scope) or self._tokens.get("*")
            if current and current != sent:
                return            # another thread logged in meanwhile: retry with that
            self._challenge(response, scope, what)

    def _challenge(self, response: httpx.Response, scope: str, what: str) -> None:
        challenge = response.headers.get("www-authenticate", "")
        scheme, _, rest = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        creds = self._credentials or auth.credentials(self.registry)
        if scheme.lower() == "basic":
            if creds is None:
                raise RegistryError(f"{self.registry}: {what}: the registry asks for a login",
                                    hint=f"run `pybuild login {self.registry}`")
            if self._tokens.get("*"):
                raise RegistryError(f"{self.registry}: {what}: the login was refused",
                                    hint=f"check the user and password (`pybuild login "
                                         f"{self.registry}`)")
            basic = httpx.BasicAuth(*creds)
            self._tokens["*"] = next(basic.auth_flow(httpx.Request("GET", "http://x"))) \
                .headers["Authorization"]
            return
        if scheme.lower() != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.registry}: {what}: unsupported authentication "
                                f"{challenge!r}")
        query: dict = {"service": params.get("service", "")}
        if scope:
            query["scope"] = scope.split(" ")       # several scopes: several parameters
        try:
            r = self.http.get(params["realm"], params=query,
                              auth=httpx.BasicAuth(*creds) if creds else None)
        except httpx.TransportError as e:
            raise RegistryError(f"{self.registry}: {what}: token service: {e}") from None
        if r.status_code != 200:
            raise RegistryError(f"{self.registry}: {what}: token service answered "
                                f"{r.status_code}",
                                hint=f"log in with `pybuild login {self.registry}`" if not creds
                                else "check the credentials")
        body = r.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"{self.registry}: {what}: the token service gave no token")
        self._tokens[scope] = f"Bearer {token}"

    # ---- the distribution API --------------------------------------------------------

    def check_login(self) -> None:
        """GET /v2/ with the credentials: raises RegistryError if the registry refuses them."""
        self.request("GET", "", scope="", what="login")

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index."""
        r = self.request("GET", f"{repo}/manifests/{reference}", scope=_scope(repo, "pull"),
                         what=f"manifest {repo}:{reference}",
                         headers={"Accept": ", ".join(MANIFEST_TYPES)})
        data = r.content
        media = r.headers.get("content-type", "").split(";")[0].strip()
        from ..image import digest_of
        digest = digest_of(data)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{self.registry}: manifest {repo}@{reference} does not match "
                                f"its digest (got {digest})")
        return data, media, digest

    def blob(self, repo: str, digest: str) -> httpx.Response:
        """A streaming response for a blob (the caller reads, verifies and closes it)."""
        return self.request("GET", f"{repo}/blobs/{digest}", scope=_scope(repo, "pull"),
                            what=f"blob {digest[:19]} of {repo}", stream=True)

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self.request("HEAD", f"{repo}/blobs/{digest}", scope=_scope(repo, "push"),
                         what=f"blob {digest[:19]} of {repo}", ok=(200, 404))
        return r.status_code == 200

    def mount_blob(self, repo: str, digest: str, source_repo: str) -> bool:
        """Cross-repository mount (same registry): True if the registry now has it in `repo`."""
        r = self.request("POST", f"{repo}/blobs/uploads/", scope=_scope(repo, "push", source_repo),
                         what=f"mount of {digest[:19]} into {repo}", ok=(201, 202),
                         params={"mount": digest, "from": source_repo})
        if r.status_code == 202:          # mount refused: cancel the upload it opened
            location = r.headers.get("location")
            if location:
                try:
                    self.request("DELETE", self._absolute(location), scope=_scope(repo, "push"),
                                 what="cancel upload", ok=(200, 202, 204, 404))
                except RegistryError:
                    pass
        return r.status_code == 201

    def upload_blob(self, repo: str, digest: str, read_chunks, size: int,
                    chunk_size: int = 0) -> None:
        """Upload a blob: monolithic (one PUT), or in PATCH chunks of `chunk_size` bytes."""
        scope = _scope(repo, "push")
        r = self.request("POST", f"{repo}/blobs/uploads/", scope=scope,
                         what=f"upload of {digest[:19]} to {repo}", ok=(202,))
        location = self._absolute(r.headers["location"])
        if chunk_size and size > chunk_size:
            offset = 0
            for chunk in read_chunks(chunk_size):
                r = self.request("PATCH", location, scope=scope, ok=(202,),
                                 what=f"upload of {digest[:19]} to {repo}", content=chunk,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
                offset += len(chunk)
                location = self._absolute(r.headers.get("location", location))
            self.request("PUT", location, scope=scope, ok=(201,), params={"digest": digest},
                         what=f"upload of {digest[:19]} to {repo}")
            return
        self.request("PUT", location, scope=scope, ok=(201,), params={"digest": digest},
                     what=f"upload of {digest[:19]} to {repo}",
                     headers={"Content-Type": "application/octet-stream",
                              "Content-Length": str(size)},
                     content=_Replayable(read_chunks))

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        r = self.request("PUT", f"{repo}/manifests/{reference}", scope=_scope(repo, "push"),
                         what=f"manifest {repo}:{reference}", ok=(200, 201),
                         headers={"Content-Type": media_type}, content=data)
        return r.headers.get("docker-content-digest", "")

    def _absolute(self, location: str) -> str:
        if "://" in location:
            return location
        return f"{self.scheme}://{self.host}{location}"


class _Replayable:
    """A request body that can be sent again (a retried upload re-reads the blob)."""

    def __init__(self, read_chunks):
        self.read_chunks = read_chunks

    def __iter__(self):
        return iter(self.read_chunks(1 << 20))


def _rewindable(content) -> bool:
    return content is None or isinstance(content, (bytes, _Replayable))


def _scope(repo: str, action: str, other: str | None = None) -> str:
    actions = "pull,push" if action == "push" else "pull"
    scope = f"repository:{repo}:{actions}"
    if other:
        scope += f" repository:{other}:pull"
    return scope


def _error(registry: str, what: str, response: httpx.Response) -> RegistryError:
    detail = ""
    try:
        errors = response.json().get("errors") or []
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except ValueError:
        detail = response.text[:200]
    status = response.status_code
    hint = None
    if status == 404:
        hint = "check the name and tag, and that the image was pushed"
    elif status in (401, 403):
        hint = f"log in with `pybuild login {registry}`, or check the repository's permissions"
    error = RegistryError(f"{registry}: {what}: {status} {response.reason_phrase}"
                          + (f" ({detail})" if detail else ""), hint=hint)
    error.status = status
    return error
