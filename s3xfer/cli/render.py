"""Plain-text rendering of surveys, plans and upload reports for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import format_size

if TYPE_CHECKING:  # what is rendered; loading the modules is left to the commands that use them
    from ..planning.plan import Plan
    from ..planning.survey import HistogramBin, Survey
    from ..write.upload import UploadReport

BAR = "█"
BAR_WIDTH = 40
MAX_PROBLEMS = 20

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float) -> str:
    """A byte count in binary units: '0 B', '512 B', '16.0 KiB', '1.4 GiB'."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        # Whole bytes stay whole; a fractional mean of a few bytes keeps one decimal.
        return f"{sign}{value:.0f} B" if value == int(value) else f"{sign}{value:.1f} B"
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if round(value, 1) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024  # 1023.96 KiB would print as "1024.0 KiB"
        unit += 1
    return f"{sign}{value:.1f} {_UNITS[unit]}"


def bin_label(histogram_bin: HistogramBin) -> str:
    """'empty' for the zero-size bin, else 'lo – hi' with exact powers of two: '4 KiB – 8 KiB'."""
    if histogram_bin.hi == 1:
        return "empty"
    return f"{_power_of_two(histogram_bin.lo)} – {_power_of_two(histogram_bin.hi)}"


def _power_of_two(n: int) -> str:
    unit = 0
    while n >= 1024 and n % 1024 == 0 and unit < len(_UNITS) - 1:
        n //= 1024
        unit += 1
    return f"{n} {_UNITS[unit]}"


def render_survey(survey: Survey) -> str:
    """The survey as readable lines: totals, size statistics, histogram, largest, problems."""
    stats = survey.stats
    lines = [f"Survey of {_printable(str(survey.root))}"]
    if survey.selection:
        lines.append(f"  only     {_printable(survey.selection.describe())}")
    rows = [
        ("files", f"{stats.count:,}"),
        ("total", f"{human_bytes(stats.total_bytes)} ({stats.total_bytes:,} bytes)"),
    ]
    if stats.count:
        rows += [
            ("smallest", human_bytes(stats.min_size)),
            ("largest", human_bytes(stats.max_size)),
            ("mean", human_bytes(stats.mean)),
            ("median", human_bytes(stats.median)),
            ("std dev", human_bytes(stats.stdev)),
        ]
    rows.append(("problems", f"{len(survey.problems):,}"))
    lines += [f"  {name:<10}{value}" for name, value in rows]

    if stats.histogram:
        lines += ["", "Size histogram"]
        labels = _aligned_bin_labels(stats.histogram)
        count_width = max(len(f"{b.count:,}") for b in stats.histogram)
        biggest = max(b.count for b in stats.histogram)
        for label, histogram_bin in zip(labels, stats.histogram, strict=True):
            bar = BAR * _bar_length(histogram_bin.count, biggest)
            count = f"{histogram_bin.count:,}"
            lines.append(f"  {label}  {count:>{count_width}} {bar}".rstrip())

    if stats.largest:
        lines += ["", "Largest files"]
        sizes = [human_bytes(size) for size, _ in stats.largest]
        size_width = max(len(size) for size in sizes)
        lines += [
            f"  {size:>{size_width}}  {_printable(path)}"
            for size, (_, path) in zip(sizes, stats.largest, strict=True)
        ]

    if survey.problems:
        lines += ["", f"Problems ({len(survey.problems):,})"]
        shown = survey.problems[:MAX_PROBLEMS]
        reason_width = max(len(p.reason) for p in shown)
        lines += [f"  {p.reason:<{reason_width}}  {_printable(p.path)}" for p in shown]
        if len(survey.problems) > MAX_PROBLEMS:
            lines.append(f"  … and {len(survey.problems) - MAX_PROBLEMS:,} more")

    return "\n".join(lines) + "\n"


def _aligned_bin_labels(histogram: list[HistogramBin]) -> list[str]:
    # Line the dashes up: lower bounds right-aligned, upper bounds left-aligned.
    bounds = [(_power_of_two(b.lo), _power_of_two(b.hi)) for b in histogram if b.hi > 1]
    lo_width = max((len(lo) for lo, _ in bounds), default=0)
    hi_width = max((len(hi) for _, hi in bounds), default=0)
    width = max(lo_width + 3 + hi_width, len("empty"))
    return [
        f"{'empty':<{width}}"
        if b.hi == 1
        else f"{_power_of_two(b.lo):>{lo_width}} – {_power_of_two(b.hi):<{hi_width}}"
        for b in histogram
    ]


def _bar_length(count: int, biggest: int) -> int:
    if count == 0:
        return 0
    # At least one block, so a bin with a few files is not mistaken for an empty one.
    return max(1, round(BAR_WIDTH * count / biggest))


def _printable(text: str) -> str:
    """A name as one harmless line, like `ls -b`: control characters, other unprintable ones
    (bidirectional overrides, line separators) and undecodable bytes (lone surrogates) as
    escapes, and a backslash doubled, so that every name prints differently. --json output
    keeps the exact names."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): the byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:  # so \x80 and up always mean a byte, never a character
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def render_plan(plan: Plan) -> str:
    e = plan.estimate
    lines = [
        f"plan: {plan.source} → {plan.dest}",
        f"  files             {e.files:>12,}  ({e.packed_files:,} packed into {e.shards:,} "
        f"tar shards, {e.single_puts:,} single PUTs, {e.multipart_uploads:,} multipart)",
        f"  objects           {e.objects:>12,}",
        f"  parts             {e.parts:>12,}",
        f"  requests          {e.requests:>12,}",
        f"  bytes             {e.bytes:>12,}  ({human_bytes(e.bytes)})",
        f"  request cost      ${e.request_cost_usd:>11.4f}  at ${plan.config.prices.put_per_1000}"
        " per 1,000 PUTs",
        f"  storage cost      ${e.storage_cost_usd_month:>11.4f}  per month at "
        f"${plan.config.prices.storage_gb_month} per GB-month",
        f"  settings          memory budget {format_size(plan.config.max_memory)}, "
        f"part size {format_size(plan.config.part_size)}, "
        f"multipart from {format_size(plan.config.multipart_threshold)}, "
        f"key prefix {plan.config.key_prefix}, "
        + (
            f"packing files under {format_size(plan.config.pack_threshold)} into "
            f"~{format_size(plan.config.shard_size)} shards"
            if plan.config.pack
            else "no packing"
        ),
    ]
    objects = plan.config.objects
    carried = [
        f"Content-Type {objects.content_type}"
        if objects.content_type
        else "Content-Type by extension"
        if objects.guess_content_type
        else "no Content-Type",
        f"storage class {objects.storage_class or 'STANDARD'}",
    ]
    if objects.metadata:
        carried.append("metadata " + ", ".join(f"{k}={v}" for k, v in objects.metadata))
    lines.append(f"  objects carry     {_printable(', '.join(carried))}")
    if plan.selection:
        lines.append(
            f"  selection         {_printable(plan.selection.describe())} (the dataset's files "
            "outside it are left alone)"
        )
    if plan.problems:
        lines.append(
            f"  skipped           {len(plan.problems):>12,}  unreadable paths (see survey)"
        )
    return "\n".join(lines)


def render_report(report: UploadReport) -> str:
    lines = [
        f"uploaded {report.files_uploaded:,} files, {human_bytes(report.bytes_uploaded)} "
        f"in {report.seconds:.1f} s ({report.mb_per_s:.1f} MB/s) to {report.dest}",
        f"  unchanged {report.files_unchanged:,} files ({human_bytes(report.bytes_unchanged)}), "
        f"requests {report.requests:,}, retries {report.retries:,}"
        + (f" ({report.throttled:,} throttled)" if report.throttled else "")
        + f", failed {report.files_failed:,}",
    ]
    if report.write_requests == 0 and report.files_failed == 0:
        lines.append("  nothing changed since the last upload: no PUT was sent")
    if report.files_removed or report.objects_deleted:
        lines.append(
            f"  removed {report.files_removed:,} files no longer in the tree from the dataset; "
            f"deleted {report.objects_deleted:,} objects nothing refers to any more"
        )
    if report.files_kept_deleted:
        lines.append(
            f"  kept {report.files_kept_deleted:,} files that are no longer in the tree "
            "(--keep-deleted, or under a path that could not be read)"
        )
    if report.files_not_selected:
        lines.append(
            f"  left alone {report.files_not_selected:,} files of the dataset outside "
            "--include/--exclude"
        )
    if report.files_from_journal or report.uploads_resumed:
        lines.append(
            f"  resumed an interrupted upload: {report.files_from_journal:,} files were already "
            f"done, {report.uploads_resumed:,} multipart uploads continued "
            f"({human_bytes(report.bytes_reused)} of parts verified in place, not sent again)"
        )
    choice = report.concurrency_choice
    if choice.get("mode") == "auto":
        lines.append(render_concurrency_choice(choice))
    if report.throttled:
        lines.append(
            f"  S3 asked to slow down {report.throttled:,} times: requests in flight lowered "
            f"to {report.lowest_concurrency} (of {report.concurrency}), then raised again"
        )
    for path, reason in report.problems[:20]:
        lines.append(f"  skipped {path}: {reason}")
    if len(report.problems) > 20:
        lines.append(f"  … and {len(report.problems) - 20} more skipped paths")
    lines.extend(f"  FAILED {_printable(path)}: {error}" for path, error in report.failures)
    return "\n".join(lines)


def render_concurrency_choice(choice: dict[str, Any]) -> str:
    """What the tuner chose (AdaptiveGate.summary), in one line."""
    line = (
        f"  concurrency       {choice['final']} in flight at the end, {choice['peak']} at most "
        f"(auto: {choice['reason']}; {choice['backoffs']} backoffs)"
    )
    large = choice.get("large")
    if large and large["peak"] != large["start"]:
        line += f"; large requests {large['final']} ({large['reason']})"
    return line
