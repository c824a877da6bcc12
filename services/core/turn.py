"""The pure part of a turn: from an inbound message and the model's answer to events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from contracts.events import (
    MessageReceived,
    MessageRefused,
    SendMessage,
    TokenUsage,
    ToolCallRecord,
    TurnCompleted,
    TurnFailed,
    derived_id,
)
from contracts.payloads import ChatState, HistoryEntry
from services.core.llm import ChatMessage, Completion

REPLY_LIMIT = 4096  # characters per WhatsApp message we send; longer replies are split
QUOTE_TEXT_LIMIT = 1024  # characters of the answered message a quoting job carries

QuotePolicy = Literal["groups", "always", "never"]


@dataclass(frozen=True)
class TurnOutput:
    """What one turn publishes: jobs first, then the turn record."""

    jobs: list[SendMessage]
    record: TurnCompleted | TurnFailed


def turn_id(inbound: MessageReceived) -> str:
    """The turn's id, derived from its inbound event: a redelivery dedupes."""
    return derived_id("turn", inbound.id)


def job_id(inbound: MessageReceived, index: int) -> str:
    """A reply job's id, derived from its cause and position: a redelivery dedupes."""
    return derived_id("job", inbound.id, str(index))


def skip_reason(
    inbound: MessageReceived, groups: Literal["mention", "all", "none"] = "mention"
) -> str | None:
    """Why this message gets no answer, or None to answer it."""
    if inbound.from_me:
        return "own message"
    if inbound.chat == "status@broadcast":
        return "status broadcast"
    if inbound.is_group and (groups == "none" or (groups == "mention" and not inbound.mentioned)):
        return "group message without a mention" if groups == "mention" else "group message"
    return None


def quotes(inbound: MessageReceived, policy: QuotePolicy = "groups") -> bool:
    """Whether the reply to `inbound` quotes it (SVC_QUOTE_REPLIES): in a group a quote
    says whom the agent answers; in a 1:1 chat only `always` quotes."""
    return policy == "always" or (policy == "groups" and inbound.is_group)


def prompt(
    inbound: MessageReceived, system_prompt: str, state: ChatState | None = None
) -> list[ChatMessage]:
    """The model's input: system prompt, the chat's recent history, the new message."""
    history = [ChatMessage(h.role, h.text) for h in (state.history if state else [])]
    return [ChatMessage("system", system_prompt), *history, ChatMessage("user", inbound.text)]


def remember(
    state: ChatState,
    seq: int,
    entries: list[HistoryEntry],
    *,
    max_messages: int,
    max_chars: int,
) -> ChatState:
    """The state after a settled turn: position `seq`, history bounded by count and size
    (oldest dropped first)."""
    history = [*state.history, *entries][-max_messages:] if max_messages else []
    while history and sum(len(h.text) for h in history) > max_chars:
        history = history[1:]
    return ChatState(chat=state.chat, last_seq=max(seq, state.last_seq), history=history)


def split_reply(text: str, limit: int = REPLY_LIMIT) -> list[str]:
    """Split a reply into messages of at most `limit` chars, preferring line/word breaks."""
    text = text.strip()
    parts: list[str] = []
    while len(text) > limit:
        cut = max(text.rfind("\n", 0, limit), text.rfind(" ", 0, limit))
        cut = cut if cut > limit // 2 else limit
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        parts.append(text)
    return parts


def completed(
    inbound: MessageReceived,
    completion: Completion,
    model: str,
    latency_ms: float,
    tools: list[ToolCallRecord] | None = None,
    reply_limit: int = REPLY_LIMIT,
    *,
    plugins_seq: int = 0,
    quote: QuotePolicy = "groups",
) -> TurnOutput:
    """The events of a turn that produced `completion`; its first reply quotes the
    message it answers when `quote` says so."""
    quoted = quotes(inbound, quote)
    jobs = [
        SendMessage(
            id=job_id(inbound, i),
            job_id=job_id(inbound, i),
            channel=inbound.channel,
            account=inbound.account,
            chat=inbound.chat,
            text=part,
            reply_to=inbound.message_id if i == 0 and quoted else None,
            reply_to_sender=inbound.sender if i == 0 and quoted else "",
            reply_to_text=inbound.text[:QUOTE_TEXT_LIMIT] if i == 0 and quoted else "",
            cause_id=inbound.id,
        )
        for i, part in enumerate(split_reply(completion.text, reply_limit))
    ]
    usage = (
        TokenUsage(
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
        )
        if completion.prompt_tokens or completion.completion_tokens
        else None
    )
    record = TurnCompleted(
        id=turn_id(inbound),
        channel=inbound.channel,
        account=inbound.account,
        chat=inbound.chat,
        inbound_id=inbound.id,
        model=model,
        tools_called=tools or [],
        reply_ids=[j.job_id for j in jobs],
        latency_ms=round(latency_ms, 3),
        usage=usage,
        plugins_seq=plugins_seq,
    )
    return TurnOutput(jobs=jobs, record=record)


def skipped(inbound: MessageReceived, reason: str, model: str) -> TurnOutput:
    """A turn that answers nothing on purpose (still recorded: every inbound ends in a turn)."""
    record = TurnCompleted(
        id=turn_id(inbound),
        channel=inbound.channel,
        account=inbound.account,
        chat=inbound.chat,
        inbound_id=inbound.id,
        model=model,
        skipped=reason,
    )
    return TurnOutput(jobs=[], record=record)


def failed(
    inbound: MessageReceived,
    error: str,
    model: str,
    fallback: str = "",
    plugins_seq: int = 0,
    *,
    quote: QuotePolicy = "groups",
) -> TurnOutput:
    """A turn that could not complete; `fallback` (if any) is still sent to the user."""
    jobs = (
        completed(inbound, Completion(text=fallback), model, 0, quote=quote).jobs
        if fallback
        else []
    )
    record = TurnFailed(
        id=turn_id(inbound),
        channel=inbound.channel,
        account=inbound.account,
        chat=inbound.chat,
        inbound_id=inbound.id,
        model=model,
        error=error,
        reply_ids=[j.job_id for j in jobs],
        plugins_seq=plugins_seq,
    )
    return TurnOutput(jobs=jobs, record=record)


def refused(inbound: MessageReceived, rule: str, detail: str = "") -> MessageRefused:
    """A message a policy refused: it ends its inbound like a turn, without a model call."""
    return MessageRefused(
        id=derived_id("refused", inbound.id),
        channel=inbound.channel,
        account=inbound.account,
        chat=inbound.chat,
        sender=inbound.sender,
        message_id=inbound.message_id,
        rule=rule,
        inbound_id=inbound.id,
        detail=detail,
    )
