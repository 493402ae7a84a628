"""The Dockerfiles and deploy/compose.yaml, checked without Docker.

The build stage of each Dockerfile is replayed here. Its COPY lines copy the same files
from the repository into a scratch folder, and its `uv sync` lines run against them.
A missing file, a lock that is not `--frozen`-clean or a dependency of another service
then fails here and not at `docker build` time.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "deploy" / "images"
SERVICES = ("gateway", "planner", "executor", "projector")
# What each image must carry, and what belongs to other services and must stay out.
REQUIRED = {
    "gateway": {"fastapi", "uvicorn", "asyncpg"},
    "planner": {"google-genai"},
    "executor": {"browser-use", "google-genai"},
    "projector": {"alembic", "asyncpg"},
}
FORBIDDEN = {
    "gateway": {"browser-use", "google-genai", "alembic"},
    "planner": {"fastapi", "browser-use", "alembic", "asyncpg"},
    "executor": {"fastapi", "alembic", "asyncpg"},
    "projector": {"fastapi", "browser-use", "google-genai"},
}


def instructions(service: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs of a Dockerfile, with continuation lines joined."""
    text = (IMAGES / service / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(service: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(service):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_image_stages_and_non_root_user(service: str) -> None:
    all_stages = stages(service)
    assert len(all_stages) >= 3, "uv, build and runtime stages expected"
    runtime = all_stages[-1]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, f"{service}: the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"{service}: USER {users[-1]} must be a numeric id"
    assert int(uid) > 0, f"{service}: USER {users[-1]} must not be root"
    entrypoint = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == [f'["stepwise-{service}"]']
    copies_from_build = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert copies_from_build == ["--from=build /app/.venv /app/.venv"], (
        f"{service}: the runtime stage must take only the virtual environment from the build"
    )
    for keyword, rest in instructions(service):
        if keyword in ("FROM", "ARG") and ":" in rest:
            assert not rest.endswith(":latest"), f"{service}: {rest} is not pinned"


def test_image_chromium_only_in_executor() -> None:
    for service in SERVICES:
        runtime = stages(service)[-1]
        installs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
        assert ("chromium" in installs) == (service == "executor"), service


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        candidates = [path] + [
            str(Path(*Path(path).parts[:n])) for n in range(1, len(Path(path).parts))
        ]
        if body.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, body[3:]) for part in Path(path).parts)
        else:
            hit = any(fnmatch.fnmatch(candidate, body) for candidate in candidates)
        if hit:
            ignored = not negate
    return ignored


def _context(service: str) -> list[str]:
    """Return the files of the build context that the Dockerfile.dockerignore lets through."""
    ignore = (IMAGES / service / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [path for path in listed if not _ignored(path, patterns) and (REPO / path).is_file()]


@pytest.mark.parametrize("service", SERVICES)
def test_image_build_stage_dependencies(service: str, tmp_path: Path) -> None:
    context = set(_context(service))
    assert "uv.lock" in context
    assert f"services/{service}/pyproject.toml" in context
    other_sources = {
        p for p in context if p.startswith("services/") and f"services/{service}/" not in p
    }
    assert all(p.endswith("pyproject.toml") for p in other_sources), other_sources

    [build] = [stage for stage in stages(service) if stage[0][1].endswith(" AS build")]
    workdir = tmp_path / "src"
    venv = tmp_path / "venv"
    workdir.mkdir()
    environment = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    environment.pop("VIRTUAL_ENV", None)
    ran = []
    for keyword, rest in build:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, target = shlex.split(rest)
            for source in sources:
                _copy(source.rstrip("/"), target, context, workdir)
        elif keyword == "RUN":
            command = re.sub(r"--mount=\S+\s*", "", rest).strip()
            assert command.startswith("uv sync "), f"{service}: unexpected build step {command}"
            assert "--frozen" in command
            assert f"--package stepwise-{service}" in command
            assert "--no-dev" in command
            result = subprocess.run(
                [_uv(), *shlex.split(command)[1:]],
                cwd=workdir,
                env=environment,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, f"{command} failed:\n{result.stderr}"
            ran.append(command)
    assert len(ran) == 2, "a dependencies layer and a project layer expected"

    python = venv / "bin" / "python"
    names = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m;"
            "print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert f"stepwise-{service}" in names
    assert "stepwise-libs" in names
    assert (venv / "bin" / f"stepwise-{service}").exists()
    assert REQUIRED[service] <= set(names), (
        f"{service} image lacks {REQUIRED[service] - set(names)}"
    )
    assert not FORBIDDEN[service] & set(names), (
        f"{service} image carries {FORBIDDEN[service] & set(names)}"
    )
    for other in SERVICES:
        assert (f"stepwise-{other}" in names) == (other == service)
    assert "pytest" not in names
    assert "stepwise" not in names


def _uv() -> str:
    """Return the uv that runs this test: `uv run` exports its own path as UV."""
    candidates = [os.environ.get("UV"), shutil.which("uv"), str(Path.home() / ".local/bin/uv")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("uv not found: run the tests with `uv run pytest` or put uv on PATH")


def _copy(source: str, target: str, context: set[str], workdir: Path) -> None:
    matched = [p for p in context if p == source or p.startswith(source + "/")]
    assert matched, f"COPY {source}: nothing in the build context matches"
    destination = workdir / target
    for path in matched:
        if target.endswith("/"):
            relative = Path(path).relative_to(source) if path != source else Path(Path(path).name)
            out = destination / relative
        else:
            out = destination
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, out)


def test_compose_services_and_images() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"nats", "postgres", "migrate", *SERVICES} == set(services)
    for service in SERVICES:
        build = services[service]["build"]
        assert build["dockerfile"] == f"deploy/images/{service}/Dockerfile"
        assert (REPO / "deploy" / build["context"] / build["dockerfile"]).resolve().is_file()
    for name, service in services.items():
        image = service["image"]
        assert image.rpartition(":")[2] not in ("", "latest"), f"{name}: {image} is not pinned"
    assert "--jetstream" in services["nats"]["command"]
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"])
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["build"]["dockerfile"] == "deploy/images/projector/Dockerfile"
    for service in ("gateway", "projector"):
        assert (
            services[service]["depends_on"]["migrate"]["condition"]
            == "service_completed_successfully"
        )
        assert "postgres:5432" in services[service]["environment"]["STEPWISE_DATABASE_URL"]
    for service in SERVICES:
        assert services[service]["environment"]["STEPWISE_NATS_URL"] == "nats://nats:4222"
    assert services["executor"]["stop_grace_period"] == "150s"
