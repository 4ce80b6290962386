"""The web UI's safety rules, checked over HTTP: loopback unless told otherwise (then a token), nothing served or
accepted from outside its workspace (path traversal), size-limited uploads, pickers that only take offered values."""
import os
import socket
from pathlib import Path

import httpx
import pytest

from conceptkit.errors import UserError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, workspace, a secret file beside the workspace, a logged-in client) of a token-protected UI."""
    from conceptkit.ui.app import serve

    root = tmp_path_factory.mktemp("security")
    work = root / "work"
    secret = root / "secret.txt"
    secret.write_text("the user's private notes")
    port = free_port()
    app, queue = serve(port=port, work=str(work), token="s3cret-token", max_upload_mb=1, block=False)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/login", data={"username": "me", "password": "s3cret-token"}).status_code == 200
    yield url, work, secret, client
    client.close()
    app.close()


def test_another_host_than_loopback_needs_a_token(tmp_path):
    from conceptkit.ui.app import serve

    with pytest.raises(UserError, match="--token"):
        serve(host="0.0.0.0", port=free_port(), work=str(tmp_path), block=False)


def test_without_the_token_nothing_is_served(served):
    url, work, _, _ = served
    anonymous = httpx.Client(base_url=url, timeout=30)
    for path in ("/config", "/gradio_api/info", f"/gradio_api/file={work}/x.png"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.post("/login", data={"username": "me", "password": "guess"}).status_code != 200
    assert anonymous.get("/config").status_code == 401


@pytest.mark.parametrize("where", ["absolute", "dotdot", "encoded", "repository"])
def test_files_outside_the_workspace_are_not_served(served, where):
    url, work, secret, client = served
    path = {"absolute": str(secret),
            "dotdot": f"{work}/../{secret.name}",
            "encoded": f"{work}/%2e%2e/{secret.name}",
            "repository": str(REPO / "README.md")}[where]
    response = client.get(f"/gradio_api/file={path}")
    assert response.status_code in (403, 404), (path, response.status_code)
    assert "private notes" not in response.text


def test_files_inside_the_workspace_are_served(served):
    _, work, _, client = served
    (work / "generate").mkdir(parents=True, exist_ok=True)
    (work / "generate" / "ok.txt").write_text("generated")
    response = client.get(f"/gradio_api/file={work}/generate/ok.txt")
    assert response.status_code == 200 and response.text == "generated"


def test_uploads_are_size_limited_and_land_in_the_workspace(served):
    _, work, _, client = served
    big = client.post("/gradio_api/upload", files={"files": ("big.png", b"\0" * 1_100_000)})
    assert big.status_code == 413
    small = client.post("/gradio_api/upload", files={"files": ("small.png", b"\0" * 1000)})
    assert small.status_code == 200
    (stored,) = small.json()
    assert Path(stored).resolve().is_relative_to((work / "uploads").resolve())
    assert not any(p.name == "big.png" for p in (work / "uploads").rglob("*"))


@pytest.mark.parametrize("field", ["model", "embedding", "lora", "promptnet"])
def test_generate_refuses_paths_that_were_not_offered(tmp_path, field):
    """The page's API takes any string; the handler only accepts what the pickers offer."""
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    ui = UI(JobQueue(tmp_path / "jobs"), tmp_path, ["toy"])
    values = {"model": "toy", "embedding": [], "lora": [], "promptnet": ""}
    values[field] = {"model": "/etc", "embedding": ["/etc/passwd"], "lora": ["../../secret.safetensors"],
                     "promptnet": "/root"}[field]
    images, message = ui.generate(values["model"], "a red star", "", 0, 2, 7.5, "ddim", 1, values["embedding"],
                                  values["lora"], values["promptnet"])
    assert images == [] and "not one of the offered" in message
    assert not (tmp_path / "generate").exists()  # refused before anything ran


def test_compose_and_learn_refuse_models_and_loras_that_were_not_offered(tmp_path):
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    queue = JobQueue(tmp_path / "jobs")
    ui = UI(queue, tmp_path, ["toy"])
    first = next(iter(ui.concepts()))
    _, message = ui.start_compose("toy", "a {a} and a {b}", "a", first, "b", "/etc/passwd", "", None,
                                  ["clora"], 2, 0)
    assert "not one of the offered" in message
    _, message = ui.start_learn("/somewhere/else", "Textual Inversion", [], "<x>", "object", 2, 0)
    assert "not one of the offered models" in message
    assert queue.list() == []


def test_free_text_cannot_become_an_option(tmp_path):
    """A token or prompt that looks like an option stays one argument (--opt=value), so it cannot redirect --out."""
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    image = REPO / "src/conceptkit/bundled/concepts/red-striped-star/0.png"
    queue = JobQueue(tmp_path / "jobs", program=("true",))  # records the command, runs nothing
    ui = UI(queue, tmp_path, ["toy"])
    ui.start_learn("toy", "Textual Inversion", [str(image)], "--out=/tmp/elsewhere", "--steps=1", 2, 0)
    (job,) = queue.list()
    command = job.commands[0]
    assert "--token=--out=/tmp/elsewhere" in command and "--init-word=--steps=1" in command
    assert command[command.index("--out") + 1] == str(job.out)
    assert command.count("--out") == 1


def test_compose_slots_take_every_kind_of_concept(tmp_path):
    """A slot holds a LoRA, a learned embedding or an image; each becomes its own compose option."""
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    queue = JobQueue(tmp_path / "jobs", program=("true",))  # records the command, runs nothing
    ui = UI(queue, tmp_path, ["toy"])
    offered = ui.concepts()
    lora = next(label for label, (kind, _) in offered.items() if kind == "lora")
    image = next(label for label, (kind, _) in offered.items() if kind == "image")
    ui.start_compose("toy", "a {a} and a {b}", "a", lora, "b", image, "", None, ["clora"], 2, 0)
    (job,) = queue.list()
    command = job.commands[0]
    assert command[command.index("--lora") + 1] == f"a={offered[lora][1]}"
    assert command[command.index("--image") + 1] == f"b={offered[image][1]}"
    # words typed into a slot: text, one --words argument (a ':' would start a class word: dropped), never a path
    ui.start_compose("toy", "a {a} and a {b}", "a", lora, "b", "Words: pink:dotted  cross", "", None, ["clora"], 2, 0)
    (command,) = [j.commands[0] for j in queue.list() if "--words" in j.commands[0]]
    assert command[command.index("--words") + 1] == "b=pink dotted cross"
    _, message = ui.start_compose("toy", "a {a} and a {b}", "a", lora, "b", "Words:  ", "", None, ["clora"], 2, 0)
    assert "write the concept after 'Words:'" in message and len(queue.list()) == 2


def test_generate_calls_the_python_api_and_shows_the_command(tmp_path, monkeypatch):
    import conceptkit.cli
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    monkeypatch.setattr(conceptkit.cli, "main", lambda *a, **k: pytest.fail("the UI went through cli.main"))
    ui = UI(JobQueue(tmp_path / "jobs"), tmp_path, ["toy"])
    images, message = ui.generate("toy", "a red star", "", 0, 2, 7.5, "euler", 2, [], [], "")
    assert len(images) == 2 and "conceptkit generate --model toy '--prompt=a red star'" in message
    assert "--scheduler euler" in message
    images, message = ui.generate("toy", "a red star", "", 0, 2, 7.5, "nope", 1, [], [], "")
    assert images == [] and "unknown scheduler" in message


def test_profusion_tab_passes_extra_images_and_the_start_timestep(tmp_path):
    """More images of the object become generate --extra-image FILE:WEIGHT (copied into the job), a start timestep
    generate --start-timestep; bad values are refused before anything is queued."""
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    images = sorted((REPO / "src/conceptkit/bundled/concepts/red-striped-star").glob("*.png"))
    queue = JobQueue(tmp_path / "jobs", program=("true",))  # records the commands, runs nothing
    ui = UI(queue, tmp_path, ["toy"])
    for weight, start in ((0.0, 0), (float("nan"), 0), (1.0, 1000)):
        _, message = ui.start_profusion("toy", str(images[0]), "a S* on a navy background", 2, 2, 0,
                                        [str(images[1])], weight, start)
        assert "ck-error" in message, (weight, start)
    assert queue.list() == []
    ui.start_profusion("toy", str(images[0]), "a S* on a navy background", 2, 2, 0,
                       [str(images[1]), str(images[2])], 0.5, 300)
    (job,) = queue.list()
    for command in job.commands[1:]:  # the fusion and the plain generate
        extras = [command[i + 1] for i, a in enumerate(command) if a == "--extra-image"]
        assert extras == [f"{job.folder}/images/extra-0.png:0.5", f"{job.folder}/images/extra-1.png:0.5"]
        assert command[command.index("--start-timestep") + 1] == "300"
    copied = sorted(p.name for p in (Path(job.folder) / "images").iterdir())
    assert copied == ["extra-0.png", "extra-1.png", "reference.png"]
    assert (Path(job.folder) / "images" / "extra-1.png").read_bytes() == images[2].read_bytes()
    ui.start_profusion("toy", str(images[0]), "a S* on a navy background", 2, 2, 0)  # the defaults: neither option
    (plain,) = [j for j in queue.list() if j.id != job.id]
    assert not any(a in ("--extra-image", "--start-timestep") for c in plain.commands for a in c)


def test_compose_weights_masks_temperature_text_encoder_and_lora_end_become_compose_options(tmp_path):
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    queue = JobQueue(tmp_path / "jobs", program=("true",))  # records the command, runs nothing
    ui = UI(queue, tmp_path, ["toy"])
    offered = ui.concepts()
    a, b = [label for label, (kind, _) in offered.items() if kind == "lora"][:2]
    ui.start_compose("toy", "a {a} and a {b}", "a", a, "b", b, "", None, ["clora"], 2, 0, 0.8, 1.0, 1.0,
                     True, 0.2, False, 0.5)
    (job,) = queue.list()
    command = job.commands[0]
    assert command[command.index("--lora-end") + 1] == "0.5"
    assert f"a={offered[a][1]}@0.8" in command and f"b={offered[b][1]}" in command
    assert command[command.index("--temperature") + 1] == "0.2" and "--no-text-encoder-lora" in command
    assert "--mask-exclusive" in command and command[command.index("--mask-threshold") + 1] == "0"
    ui.start_compose("toy", "a {a} and a {b}", "a", a, "b", b, "", None, ["clora"], 2, 0, 1.0, 1.0, 1.0, False)
    (command,) = [j.commands[0] for j in queue.list() if j.commands[0] != command]
    assert "--mask-exclusive" not in command and "--no-text-encoder-lora" not in command and "--lora-end" not in command
    _, message = ui.start_compose("toy", "a {a} and a {b}", "a", a, "b", b, "", None, ["clora"], 2, 0, -1.0)
    assert "weight must be a number" in message and len(queue.list()) == 2
    _, message = ui.start_compose("toy", "a {a} and a {b}", "a", a, "b", b, "", None, ["clora"], 2, 0, 1.0, 1.0, 1.0,
                                  True, 0.5, True, 0)
    assert "LoRA end must be" in message and len(queue.list()) == 2
