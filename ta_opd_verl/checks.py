"""Checks that stop a bad TA-OPD run before training, with a message that names the key.

They run twice: in the driver before Ray starts, through a Hydra callback that our configs declare
(``hydra.callbacks.ta_opd_preflight``, Hydra's ``Callback.on_job_start`` runs before verl's ``main``), and
again in TA-OPD's trainer (for runs that compose their own config without the callback). What only one
teacher refuses, that teacher says (`ta_opd_verl.teachers`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from ta_opd_verl.config import TAOPDConfigError, TAOPDDistillationLossConfig
from ta_opd_verl.plugin_loading import require_plugin
from ta_opd_verl.special_tokens import SPECIAL_TOKEN_MAP_KEY, SpecialTokenMap, SpecialTokenMismatchError
from ta_opd_verl.teacher_prompts import (
    TEACHER_PROMPT_KEY,
    TeacherPromptError,
    TeacherPrompts,
    chat_messages,
    teacher_tokenizer,
)
from ta_opd_verl.teachers import resolve_teacher
from ta_opd_verl.teachers.base import STUDENT_PATH_KEY
from ta_opd_verl.verl_fence.agent_loop import AGENT_LOOP_MANAGER, AGENT_LOOP_MANAGER_KEY
from ta_opd_verl.verl_fence.config import omega_conf_to_dataclass
from ta_opd_verl.vocab import (
    PairCheck,
    VocabularyMismatchError,
    check_embedding_matches_config,
    check_pair,
)

__all__ = ["PreflightCallback", "TAOPDConfigError", "check_model_paths", "check_ta_opd_config"]

SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
LOSS_MODE_KEY = "distillation.distillation_loss.loss_mode"
TRAINER_MODE_KEY = "trainer.v1.trainer_mode"
ROLLOUT_N_KEY = "actor_rollout_ref.rollout.n"
DUMP_KEY = "distillation.distillation_loss.ta_opd.selection_dump_dir"
DATA_FILE_KEYS = ("data.train_files", "data.val_files")


def _select(config: DictConfig, key: str, default=None):
    return OmegaConf.select(config, key, default=default)


def check_ta_opd_config(config: DictConfig) -> None:
    """Validate the composed verl config of a TA-OPD run. Raises :class:`TAOPDConfigError`."""
    require_plugin()
    if not _select(config, "distillation.enabled", False):
        raise TAOPDConfigError("TA-OPD needs distillation.enabled=true (it distils from the teacher servers)")
    loss_mode = _select(config, LOSS_MODE_KEY)
    if loss_mode != "ta_opd":
        raise TAOPDConfigError(f"{LOSS_MODE_KEY}={loss_mode!r}: TA-OPD's trainer needs loss_mode=ta_opd")
    strategy = _select(config, "actor_rollout_ref.actor.strategy")
    if strategy not in SUPPORTED_STRATEGIES:
        raise TAOPDConfigError(
            f"actor_rollout_ref.actor.strategy={strategy!r} is not supported by TA-OPD; accepted: "
            f"{', '.join(SUPPORTED_STRATEGIES)} (Megatron shards logits by vocabulary: not implemented)"
        )
    if _select(config, "algorithm.rollout_correction.bypass_mode", False):
        raise TAOPDConfigError(
            "algorithm.rollout_correction.bypass_mode=True skips the old-log-prob forward in which TA-OPD "
            "scores every position; set it to False"
        )
    if _select(config, "actor_rollout_ref.actor.use_fused_kernels", False) or _select(
        config, "actor_rollout_ref.model.use_fused_kernels", False
    ):
        raise TAOPDConfigError(
            "actor_rollout_ref.model.use_fused_kernels=True never materialises the logits TA-OPD scores; "
            "set it to False"
        )
    trainer_mode = _select(config, TRAINER_MODE_KEY)
    if trainer_mode != "ta_opd":
        raise TAOPDConfigError(
            f"{TRAINER_MODE_KEY}={trainer_mode!r}: {LOSS_MODE_KEY}=ta_opd runs only with TA-OPD's trainer; "
            "accepted: ta_opd (conf/ta_opd_trainer.yaml and conf/ta_opd_cpu.yaml set it)"
        )
    rollouts = _select(config, ROLLOUT_N_KEY, 1)
    if not (isinstance(rollouts, int) and rollouts >= 1):
        raise TAOPDConfigError(f"{ROLLOUT_N_KEY}={rollouts!r}: samples per prompt must be an integer >= 1")
    loss_config = _build_loss_config(config)
    resolve_teacher(config).check_config(config, loss_config)
    _check_dump_folder(loss_config.ta_opd.selection_dump_dir)


def _check_dump_folder(folder: str | None) -> None:
    """The selection dump's folder can be created and written (the trainer writes it after every step)."""
    if not folder:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise TAOPDConfigError(
            f"{DUMP_KEY}={folder!r} cannot be written ({error.strerror}): a writable folder is accepted"
        ) from None


def _build_loss_config(config: DictConfig) -> TAOPDDistillationLossConfig:
    """Instantiate the distillation-loss dataclass as verl's workers will (its ``__post_init__`` checks the
    ``ta_opd`` block: ratio, k <= topk, names)."""
    target = _select(config, "distillation.distillation_loss._target_")
    expected = f"{TAOPDDistillationLossConfig.__module__}.{TAOPDDistillationLossConfig.__name__}"
    if target != expected:
        raise TAOPDConfigError(
            f"distillation.distillation_loss._target_={target!r}: TA-OPD needs {expected} "
            "(verl's keys plus the ta_opd block); conf/ta_opd_common.yaml sets it"
        )
    try:
        return omega_conf_to_dataclass(config.distillation.distillation_loss)
    except InstantiationException as error:
        # Hydra wraps the dataclass's own message (which names the key) in its call details.
        raise TAOPDConfigError(str(error.__cause__ or error)) from None


def checked_pairs(config: DictConfig) -> dict[str, tuple[str, PairCheck]]:
    """The student's and the teacher's model folders exist, share a vocabulary and, where their added
    tokens differ, have the special-token map `SPECIAL_TOKEN_MAP_KEY` asks for (the teacher says which
    folders it reads: `ta_opd_verl.teachers.base.Teacher.model_paths`). Returns, per teacher key, its folder
    and what `check_pair` found."""
    student = _select(config, STUDENT_PATH_KEY)
    special_token_map = _select(config, SPECIAL_TOKEN_MAP_KEY, "auto")
    if isinstance(special_token_map, DictConfig):
        special_token_map = OmegaConf.to_container(special_token_map)
    paths = {STUDENT_PATH_KEY: student, **resolve_teacher(config).model_paths(config)}
    for key, path in paths.items():
        if path is None or not (Path(str(path)) / "config.json").is_file():
            raise TAOPDConfigError(
                f"{key}={path!r} is not a model folder: a Hugging Face folder with config.json is accepted "
                "(this check needs local folders; download hub models first)"
            )
    pairs = {}
    for key, path in paths.items():
        try:
            if key == STUDENT_PATH_KEY:
                check_embedding_matches_config(path)
                continue
            pairs[key] = (str(path), check_pair(student, path, special_token_map))
        except (VocabularyMismatchError, SpecialTokenMismatchError) as error:
            raise type(error)(f"{key}: {error}") from None
    return pairs


def check_model_paths(config: DictConfig) -> list[str]:
    """`checked_pairs` and `check_teacher_prompts`, returning what the user should be told once: each
    teacher's derived map, and prompt tokens the teacher reads as other tokens."""
    notes = []
    pairs = checked_pairs(config)
    check_teacher_prompts(config, pairs)
    teacher_prompt = _select(config, TEACHER_PROMPT_KEY, "student")
    for key, (_, pair) in pairs.items():
        if pair.token_map is not None:
            notes += [f"{key}: {line}" for line in pair.summary(teacher_prompt)]
    return notes


def special_token_maps_to_apply(pairs: dict[str, tuple[str, PairCheck]]) -> dict[str, SpecialTokenMap]:
    """Teacher folder -> its special-token map, for the teachers whose map has entries (no map, ``none`` or an
    empty map leaves the teacher reading the student's ids as they are)."""
    return {
        path: pair.token_map for path, pair in pairs.values() if pair.token_map and pair.token_map.entries
    }


def _data_files(config: DictConfig, key: str) -> list[str]:
    files = _select(config, key)
    return [files] if isinstance(files, str) else [str(path) for path in files or []]


def check_data_files(config: DictConfig) -> list[str]:
    """verl's data files exist, are parquet with the prompt column and rows, and not every prompt is longer
    than ``data.max_prompt_length`` under the student's chat template (verl's own length filter would then
    leave nothing). Returns one note per file whose prompts that filter will drop."""
    prompt_key = _select(config, "data.prompt_key", "prompt")
    max_length = _select(config, "data.max_prompt_length", 1024)
    filtering = _select(config, "data.filter_overlong_prompts", True)
    template_kwargs = _select(config, "data.apply_chat_template_kwargs")
    template_kwargs = OmegaConf.to_container(template_kwargs) if template_kwargs else {}
    tokenizer, notes = None, []
    for key in DATA_FILE_KEYS:
        for path in _data_files(config, key):
            prompts = _prompts(key, path, prompt_key)
            if not filtering:
                continue
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(_select(config, STUDENT_PATH_KEY))
            lengths = [_prompt_length(tokenizer, messages, template_kwargs) for messages in prompts]
            dropped = sum(length > max_length for length in lengths)
            if dropped == len(lengths):
                raise TAOPDConfigError(
                    f"{key}: every prompt of {path} ({len(lengths)}) is longer than data.max_prompt_length="
                    f"{max_length} tokens under the student's chat template (the shortest has "
                    f"{min(lengths)}); raise data.max_prompt_length"
                )
            if dropped:
                notes.append(
                    f"{key}: {dropped} of {len(lengths)} prompts of {path} are longer than "
                    f"data.max_prompt_length={max_length} tokens; verl's length filter drops them"
                )
    return notes


def _prompts(key: str, path: str, column: str, column_key: str = "data.prompt_key", hint: str = "") -> list:
    """The values of ``column`` (named by the config key ``column_key``) in the parquet file ``path``."""
    if not Path(path).is_file():
        raise TAOPDConfigError(f"{key}: {path!r} does not exist; a parquet file is accepted")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise TAOPDConfigError(f"{key}: {path} is not a readable parquet file ({error})") from None
    if column not in table.column_names:
        raise TAOPDConfigError(
            f"{key}: {path} has no column {column!r} ({column_key}); its columns: "
            f"{', '.join(table.column_names)}{hint}"
        )
    if table.num_rows == 0:
        raise TAOPDConfigError(f"{key}: {path} has no rows")
    return table.column(column).to_pylist()


def check_teacher_prompts(config: DictConfig, pairs: dict[str, tuple[str, PairCheck]]) -> None:
    """A teacher-side prompt (`ta_opd_verl.teacher_prompts`) can be built for every sample: each teacher's
    tokenizer has a chat template, and with ``teacher_prompt=column`` every training file has the column,
    holding chat messages in every row. With the server teacher, a teacher reading its own prompt or through
    a special-token map needs TA-OPD's agent loop manager, which a user's own manager would replace."""
    prompts = TeacherPrompts.from_config(config)
    manager = _select(config, AGENT_LOOP_MANAGER_KEY)
    sends_own_requests = prompts is not None or special_token_maps_to_apply(pairs)
    if (
        resolve_teacher(config).name == "server"
        and sends_own_requests
        and manager not in (None, AGENT_LOOP_MANAGER)
    ):
        raise TAOPDConfigError(
            f"{AGENT_LOOP_MANAGER_KEY}={manager!r}: with {TEACHER_PROMPT_KEY}!=student or a special-token "
            f"map, TA-OPD's agent loop manager ({AGENT_LOOP_MANAGER}) sends the server teacher its own "
            "sequence; accepted: null"
        )
    if prompts is None:
        return
    for key, (path, _) in pairs.items():
        if not teacher_tokenizer(path).chat_template:
            raise TAOPDConfigError(
                f"{TEACHER_PROMPT_KEY}={prompts.mode}: the teacher {key}={path} has no chat template to "
                "render its prompt with; accepted: student (the student's prompt ids), or a teacher folder "
                "whose tokenizer_config.json has a chat_template"
            )
    conversations = []
    for path in _data_files(config, "data.train_files"):
        if prompts.mode == "column":
            column, column_key = prompts.column, f"{TEACHER_PROMPT_KEY}_column"
            hint = "; `ta-opd prepare-data --teacher-prompt ...` writes it"
        else:
            column, column_key, hint = _select(config, "data.prompt_key", "prompt"), "data.prompt_key", ""
        for row, value in enumerate(_prompts("data.train_files", path, column, column_key, hint)):
            try:
                conversations.append(chat_messages(value, column))
            except TeacherPromptError as error:
                raise TAOPDConfigError(f"data.train_files: {path}, row {row}: {error}") from None
    response_length = _select(config, "data.max_response_length", 1024)
    for key, (path, _) in pairs.items():
        limit, limit_key = _teacher_context(key, path, config)
        longest = max(len(prompts.prompt_ids(path, messages)) for messages in conversations)
        needed = longest + response_length + 1
        if needed > limit:
            raise TAOPDConfigError(
                f"{TEACHER_PROMPT_KEY}={prompts.mode}: the longest teacher prompt of data.train_files has "
                f"{longest} tokens in the template of {key}={path}; with data.max_response_length="
                f"{response_length} and the one token a teacher server generates it needs {needed} > "
                f"{limit_key}={limit}; accepted: shorter teacher prompts or a larger context"
            )


def _teacher_context(key: str, path: str, config: DictConfig) -> tuple[int, str]:
    """The context a teacher scores in, and what sets it: a teacher server's ``inference.max_model_len``
    when given, else (as verl's vLLM server defaults it) the model's ``max_position_embeddings``."""
    if key.endswith(".model_path"):
        inference_key = key.removesuffix(".model_path") + ".inference.max_model_len"
        configured = _select(config, inference_key)
        if configured:
            return int(configured), inference_key
    positions = json.loads((Path(path) / "config.json").read_text()).get(
        "max_position_embeddings", sys.maxsize
    )
    return int(positions), f"{path}/config.json max_position_embeddings"


def _prompt_length(tokenizer, messages, template_kwargs: dict) -> int:
    """The prompt's token count as verl's dataset filter counts it (chat template, generation prompt)."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **template_kwargs
    )
    return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def refuse_before_start(check, config: DictConfig) -> None:
    """Run ``check(config)``; on one of our errors print its message and exit with status 2.

    Hydra turns exceptions raised by callbacks into warnings (``hydra/_internal/callbacks.py``, Hydra 1.3),
    so a failed check exits with ``SystemExit(2)``, which Hydra does not catch."""
    try:
        check(config)
    except (ValueError, OSError) as error:  # ours: TAOPDConfigError, vocabulary, special-token, head size
        print(f"ta-opd: configuration refused before start-up: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def task_config(config: DictConfig) -> DictConfig:
    """The job's config without Hydra's own node, as verl's ``main`` receives it."""
    return OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])


def _preflight(config: DictConfig) -> None:
    if _select(config, "trainer.v1.trainer_mode") == "ta_opd" or _select(config, LOSS_MODE_KEY) == "ta_opd":
        check_ta_opd_config(config)
    if _select(config, "distillation.enabled", False):
        for note in check_model_paths(config) + check_data_files(config):
            print(f"ta-opd: {note}", file=sys.stderr, flush=True)


class PreflightCallback(Callback):
    """Hydra callback: validates a TA-OPD (or verl OPD) config in the driver, before verl starts Ray."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        refuse_before_start(_preflight, task_config(config))
