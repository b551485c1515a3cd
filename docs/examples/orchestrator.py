"""Build several images at once with pybuild's library, following each build by its events.

    sudo python3 docs/examples/orchestrator.py

Three small Dockerfiles on the `busybox:demo` base (`make demo` makes it) are
built in parallel threads into one store; every event is printed with the
image it belongs to, and a failing build is caught by its error type.
"""

import tempfile
import threading
from pathlib import Path

import builder

DOCKERFILES = {
    "orchestrated/one": 'FROM busybox:demo\nRUN echo one > /which\nCMD ["cat", "/which"]\n',
    "orchestrated/two": 'FROM busybox:demo\nCOPY note.txt /note.txt\nRUN cat /note.txt\n',
    "orchestrated/broken": "FROM busybox:demo\nRUN echo about to fail && exit 3\n",
}

lock = threading.Lock()
results = {}


def build(name: str, dockerfile: str, workdir: Path) -> None:
    context = workdir / name.replace("/", "-")
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    (context / "note.txt").write_text(f"built for {name}\n")

    def on_event(event: builder.Event) -> None:
        with lock:
            print(f"{name:22} {event.kind:14} {event.to_json()}")

    try:
        image = builder.build(str(context), tags=[f"{name}:latest"], on_event=on_event)
        results[name] = image.id
    except builder.StepFailed as e:           # a RUN failed: step, line and exit status
        results[name] = f"failed at line {e.line} with status {e.status}"
    except builder.PybuildError as e:         # anything else pybuild could not do
        results[name] = f"error: {e}"


with tempfile.TemporaryDirectory() as tmp:
    threads = [threading.Thread(target=build, args=(name, df, Path(tmp)))
               for name, df in DOCKERFILES.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

for name in DOCKERFILES:
    print(f"{name}: {results[name]}")
assert results["orchestrated/one"].startswith("sha256:")
assert results["orchestrated/two"].startswith("sha256:")
assert results["orchestrated/broken"] == "failed at line 2 with status 3"
