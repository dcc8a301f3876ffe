"""What the operations share: the ``Result``, engine execution with a progress bar, the output folder
(or a temporary one when only publishing), publishing, the files written beside the weights, and
``run``, the frame every public operation runs in.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hf_residual.core import assets, engine, fp8, names, plans, vocab
from hf_residual.core import output as outputs
from hf_residual.core.checkpoint import Checkpoint
from hf_residual.core.manifest import ModelIdentity
from hf_residual.errors import ConfigError, InsufficientDiskError
from hf_residual.hub import ResolvedModel, progress_bars
from hf_residual.hub import base as hub_base
from hf_residual.hub import publish as hub_publish
from hf_residual.ops import checks
from hf_residual.ops.options import Options, Publish


@dataclass
class Result:
    """What a call wrote, for the CLI to render and for callers to inspect."""

    output: Path
    tensors: int
    bytes_written: int
    details: dict = field(default_factory=dict)


def progress_bar(
    total: int, description: str, enabled: bool
) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=not enabled, leave=False)
    return bar.update, bar.close


def execute(
    shards: list[engine.ShardPlan],
    staging: Path,
    description: str,
    progress: bool,
    checksum: str | None = None,
):
    update, close = progress_bar(engine.total_bytes(shards), description, progress)
    try:
        return engine.execute(shards, staging, checksum=checksum, on_progress=update)
    finally:
        close()


def identity_of(
    model: ResolvedModel, checkpoint: Checkpoint, samples: dict[str, list[float]] | None = None
) -> ModelIdentity:
    identity = model.identity
    identity.model_type = checkpoint.model_type
    if samples is not None:
        identity.fingerprint = checks.fingerprint(samples)
    return identity


def models_detail(**models: ResolvedModel | ModelIdentity) -> dict[str, dict]:
    """``Result.details["models"]``: each model's identity (name, repo id and pinned commit sha for a Hub
    model, model type, fingerprint) and, for one resolved on this machine, the folder it was read from."""
    out = {}
    for role, model in models.items():
        identity = model.identity if isinstance(model, ResolvedModel) else model
        out[role] = asdict(identity)
        if isinstance(model, ResolvedModel):
            out[role]["path"] = str(Path(model.path).absolute())
    return out


@contextmanager
def destination(output: str | Path | None, publish: Publish) -> Iterator[Path]:
    """The folder to write: ``output``, or a temporary one (removed after) when only publishing.

    Publishing is checked here, before any download or arithmetic: repo id shape, and a token unless dry run.
    The temporary folder is staged beside the Hugging Face cache, under ``$HF_HOME/hf-residual/staging/``,
    not in ``$TMPDIR`` (often small, or in memory): the output is as large as the model. Its free space is
    checked before anything is written (by ``staged_output``), with HF_HOME and -o named as the ways out.
    """
    if publish.repo_id is not None:
        hub_publish.check_repo_id(publish.repo_id)
        if not publish.dry_run:
            hub_publish.check_token(publish.token)
    if output is not None:
        yield Path(output)
        return
    if publish.repo_id is None:
        raise ConfigError(
            "no output: give an output folder (-o DIR), a repo to publish to (--push-to), or both"
        )
    from huggingface_hub import constants

    home = Path(os.environ.get("HF_HOME") or constants.HF_HOME).expanduser()
    root = home / "hf-residual" / "staging"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="push-", dir=root))
    try:
        yield folder / publish.repo_id.rsplit("/", 1)[-1]
    except InsufficientDiskError as error:
        if not getattr(error, "folder", Path("/")).is_relative_to(folder):
            raise
        advice = (
            f"without -o the output is staged beside the Hugging Face cache (HF_HOME={home}) before upload: "
            "free space there, point HF_HOME at a larger disk, or give -o DIR on a disk with room"
        )
        raise InsufficientDiskError(
            outputs.disk_message(error.folder, error.needed, error.available, advice)
        ) from None
    finally:
        outputs.remove_folder(folder)


def publish_result(result: Result, publish: Publish) -> Result:
    """Upload the verified output folder when asked; record what was (or would be) uploaded."""
    if publish.repo_id is not None:
        result.details["publication"] = hub_publish.publish(
            result.output,
            publish.repo_id,
            create_pr=publish.create_pr,
            private=publish.private,
            commit_message=publish.commit_message,
            token=publish.token,
            dry_run=publish.dry_run,
        )
    return result


def find_base(instruct_model: ResolvedModel, ref: str | Path) -> tuple[str, str]:
    choice = hub_base.find_base(instruct_model.path, instruct_model.identity.repo_id, str(ref))
    return choice.ref, choice.source


def license_of(*folders: Path) -> dict:
    return hub_base.agreed_license([hub_base.read_card_data(folder) for folder in folders])


def write_model_extras(
    staging: Path,
    target: Checkpoint,
    instruct_config: dict,
    vocab_size: int | None,
    chat_source: Path,
    card: str,
    keep_fp8: bool = False,
    layout: vocab.Layout | None = None,
) -> None:
    config = fp8.output_config(target.config, target.tensors, keep_fp8)  # FP8 -> BF16: no quantization_config
    vocab_size = layout.rows if layout is not None else vocab_size
    assets.write_json(staging / "config.json", assets.output_config(config, instruct_config, vocab_size))
    assets.copy_chat_assets(chat_source, staging)
    if layout is not None:  # the target's vocabulary grew: its tokens added, the rows recorded
        vocab.write_tokenizer(layout, staging)
        vocab.write_layout(layout, staging)
    (staging / "README.md").write_text(card + fp8.card_note(target.tensors, keep_fp8))


def output_jobs(
    jobs: list[engine.TensorJob], target: Checkpoint, aligned: names.TargetNames, keep_fp8: bool
) -> list:
    """The last planning steps of port and apply, on the target's side.

    The target's FP8 weights written in BF16 or re-quantized (``plans.fp8_output_jobs``), its integer
    buffers copied, and a wrapper target's other tensors (``names.extra_jobs``) copied, all under the
    target's own names. ``target``: the whole target; ``aligned``: its view under the residual's names.
    """
    view = aligned.view
    jobs = plans.with_buffers(plans.fp8_output_jobs(jobs, view.tensors, keep_fp8), view)
    extras = plans.fp8_output_jobs(names.extra_jobs(target, aligned), target.tensors, keep_fp8)
    return names.target_jobs(jobs, extras, aligned)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run(output: str | Path | None, options: Options, work: Callable[[Path], Result]) -> Result:
    """The frame of every operation: the destination (checked before any download), progress bars,
    ``work(folder)``, then publishing. ``output`` None: a temporary folder, removed after publishing."""
    with destination(output, options.publish) as out, progress_bars(options.progress):
        result = work(out)
        result.details["temporary_output"] = output is None
        return publish_result(result, options.publish)
