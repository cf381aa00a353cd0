"""The mutation check: remove one feature at a time and show that the tests named for it fail, every time.

    python -m tests.mutations                      # every mutation (TEST_DATABASE_URL for the PostgreSQL ones)
    python -m tests.mutations --only deadlock-guard,advisory-lock
    python -m tests.mutations --list

Each mutation is one edit to a copy of the repository (the exact text must be found once, so the script
breaks loudly when the code moves on) and the tests that must then fail. The copy's tests run with the
project's own interpreter; a mutation "survives" when any run of its tests passes, or stops with an error
other than failing tests (a mutation that breaks the import proves nothing). Race-prone tests run `runs`
times, and must fail every time. Exit status 1 when a mutation survives.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST_TESTS_FAILED = 1


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (old, new): each old text must be found exactly once
    tests: tuple[str, ...]
    runs: int = 1
    postgresql: bool = False


MUTATIONS = [
    Mutation(
        "rollback-after-failed-commit",
        "A failed commit never survives: the pool's reset listener rolls it back",
        "core/pool.py",
        (('    event.listen(engine.pool, "reset", rollback_leftover_transaction)\n', ""),),
        ("tests/test_db.py::test_failed_commit_is_never_reported_as_success_and_its_write_never_survives",),
    ),
    Mutation(
        "title-409",
        "A duplicate title is a 409 with its own detail",
        "items/item.py",
        (('return duplicate_is_conflict(TITLE_TAKEN, "uq_item_title", "item.title")', "return nullcontext()"),),
        (
            "tests/test_items.py::test_create_item_with_duplicate_title_returns_409",
            "tests/test_server.py::test_concurrent_creates_with_the_same_title_give_exactly_one_201",
        ),
    ),
    Mutation(
        "pgbouncer-prepared-statements",
        "Behind PgBouncer, DB_PREPARED_STATEMENTS=false turns prepared statements off",
        "core/db.py",
        (
            ('            connect_args["prepare_threshold"] = None\n', "            pass\n"),
            ('connect_args |= {"statement_cache_size": 0, "prepared_statement_cache_size": 0}', "pass"),
        ),
        ("tests/test_pgbouncer.py",),
        postgresql=True,
    ),
    Mutation(
        "deadlock-guard",
        "The sync deadlock is designed out: no more sessions at once than the pool keeps connections",
        "core/db.py",
        (("Depends(get_session, max_concurrency=SESSIONS_AT_ONCE)", "Depends(get_session)"),),
        ("tests/test_server.py::test_one_pooled_connection_and_one_worker_thread_serve_100_concurrent_clients",),
        runs=3,
    ),
    Mutation(
        "deadlock-guard-async",
        "Async requests wait for a session, not in the pool, whose timeout would turn waiting into 503s",
        "core/db.py",
        (("Depends(get_async_session, max_concurrency=SESSIONS_AT_ONCE)", "Depends(get_async_session)"),),
        (
            "tests/test_server.py::test_requests_waiting_longer_than_the_pool_timeout_for_the_only_connection_get_no_503",
        ),
        postgresql=True,
    ),
    Mutation(
        "advisory-lock",
        "Several workers start at once: migrations wait for each other (a transaction-scoped advisory lock)",
        "core/schema.py",
        (
            (
                '                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})\n',
                "                pass\n",
            ),
        ),
        ("tests/test_server.py::test_start_up_waits_for_the_schema_lock_another_process_holds",),
        postgresql=True,
    ),
    Mutation(
        "connect-timeout-default",
        "A database that never answers gives a 503 within the connect timeout (default 5 s)",
        "core/config.py",
        (("db_connect_timeout: float = Field(default=5,", "db_connect_timeout: float = Field(default=30,"),),
        ("tests/test_server.py::test_a_database_that_never_answers_gives_503s_within_the_connect_timeout",),
        postgresql=True,
    ),
    Mutation(
        "dispose-at-shutdown",
        "Shutdown closes every pooled connection",
        "main.py",
        (("    await db.dispose_engine(db.engine)\n", ""),),
        ("tests/test_db.py::test_shutdown_closes_every_pooled_connection",),
        postgresql=True,
    ),
    Mutation(
        "migrate-at-start",
        "The app migrates the database before it serves",
        "main.py",
        (("    await schema.prepare_database(db.engine, get_settings())\n", ""),),
        ("tests/test_schema.py::test_the_app_migrates_an_empty_database_at_start",),
    ),
    Mutation(
        "adopt-v1",
        "A database made by v1 is adopted with its rows",
        "core/schema.py",
        (("    context.stamp(script, first.revision)\n", ""),),
        ("tests/test_schema.py::test_a_database_made_by_v1_is_adopted_with_its_rows",),
    ),
    Mutation(
        "sqlite-migration-transaction",
        "A migration that fails half-way leaves nothing behind (SQLite too)",
        "core/schema.py",
        (('                connection.exec_driver_sql("BEGIN IMMEDIATE")\n', "                pass\n"),),
        ("tests/test_schema.py::test_a_migration_that_fails_half_way_leaves_no_table_and_no_revision_behind",),
    ),
    Mutation(
        "sqlite-batch-keeps-links",
        "A SQLite batch migration that rebuilds the item table keeps every tag link",
        "core/schema.py",
        (('        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")\n', ""),),
        ("tests/test_schema.py::test_a_batch_migration_that_rebuilds_the_item_table_keeps_its_tag_links",),
    ),
    Mutation(
        "schema-error-is-500",
        "A schema behind the models is a 500, never 503 Database unavailable",
        "core/errors.py",
        (("    if isinstance(exc, DBAPIError) and is_schema_mismatch(exc):\n", "    if False:\n"),),
        ("tests/test_hostile.py::test_a_table_missing_from_the_database_is_a_plain_500_that_says_nothing_about_sql",),
    ),
    Mutation(
        "if-match",
        "A write with a stale If-Match is a 412 and changes nothing",
        "core/etags.py",
        (('    if "*" not in tags and etag(version) not in tags:\n', "    if False:\n"),),
        ("tests/test_items.py::test_a_write_with_a_stale_if_match_answers_412_and_changes_nothing",),
    ),
    Mutation(
        "if-none-match",
        "A read whose ETag the client has is a 304",
        "core/etags.py",
        (('    return "*" in tags or etag(version) in tags\n', "    return False\n"),),
        ("tests/test_items.py::test_a_read_whose_etag_the_client_has_answers_304_with_no_body",),
    ),
    Mutation(
        "check-then-write",
        "No lost update: the version is decided under a row lock and in the UPDATE's WHERE, not by a read before",
        "items/item.py",
        (
            ("ITEM_TO_WRITE = ONE_ITEM.with_for_update(of=item_table)", "ITEM_TO_WRITE = ONE_ITEM"),
            (
                'AT_THE_VERSION_READ = item_table.c.version == bindparam("read_version")',
                'AT_THE_VERSION_READ = bindparam("read_version") == bindparam("read_version")',
            ),
        ),
        ("tests/test_item_races.py::test_twenty_puts_with_the_same_if_match_give_exactly_one_200_and_nineteen_412",),
        postgresql=True,
    ),
    Mutation(
        "version-in-the-write",
        "With If-Match, a write whose row moved on after its read is a 412: the UPDATE and DELETE name the version",
        "items/item.py",
        (
            (
                'AT_THE_VERSION_READ = item_table.c.version == bindparam("read_version")',
                'AT_THE_VERSION_READ = bindparam("read_version") == bindparam("read_version")',
            ),
        ),
        (
            "tests/test_items.py::"
            "test_a_write_with_if_match_whose_row_moved_on_after_its_read_answers_412_and_changes_nothing",
        ),
    ),
    Mutation(
        "unconditional-write",
        "Without If-Match, a write applies to the latest version (last writer wins), even if the row moved on",
        "items/item.py",
        (
            (
                "return (UPDATE_ITEM if if_match is None else UPDATE_ITEM_IF_MATCH), values",
                "return UPDATE_ITEM_IF_MATCH, values | {\"read_version\": item.version}",
            ),
        ),
        ("tests/test_items.py::test_a_write_without_if_match_whose_row_moved_on_after_its_read_still_applies",),
    ),
    Mutation(
        "tags-before-item",
        "An item's write locks its tags before its row, as a tag's rename does: no deadlock between them",
        "items/item.py",
        (
            (
                "    tag_ids = lock_tags(session, fields[\"tags\"]) if \"tags\" in fields else []  # the tags before the item\n"
                "    item = current(session.exec(ITEM_TO_WRITE, params={\"item_id\": item_id}).first(), if_match)\n",
                "    item = current(session.exec(ITEM_TO_WRITE, params={\"item_id\": item_id}).first(), if_match)\n"
                "    tag_ids = lock_tags(session, fields[\"tags\"]) if \"tags\" in fields else []\n",
            ),
            (
                "    tag_ids = await lock_tags_async(session, fields[\"tags\"]) if \"tags\" in fields else []\n"
                "    item = current((await session.exec(ITEM_TO_WRITE, params={\"item_id\": item_id})).first(), if_match)\n",
                "    item = current((await session.exec(ITEM_TO_WRITE, params={\"item_id\": item_id})).first(), if_match)\n"
                "    tag_ids = await lock_tags_async(session, fields[\"tags\"]) if \"tags\" in fields else []\n",
            ),
        ),
        ("tests/test_item_races.py::test_an_item_write_waits_for_a_rename_of_its_tag_before_it_locks_the_item",),
        postgresql=True,
    ),
    Mutation(
        "row-lock",
        "Unconditional writes racing each other all apply whole (last writer wins), none fails because of another",
        "items/item.py",
        (("ITEM_TO_WRITE = ONE_ITEM.with_for_update(of=item_table)", "ITEM_TO_WRITE = ONE_ITEM"),),
        ("tests/test_item_races.py::test_concurrent_unconditional_puts_all_apply_whole_and_the_version_counts_every_one",),
        runs=3,
        postgresql=True,
    ),
    Mutation(
        "no-op-write",
        "A write that changes nothing writes nothing",
        "items/item.py",
        (
            (
                "return {name: value for name, value in fields.items() if value != as_is[name]}",
                "return dict(fields)",
            ),
        ),
        ("tests/test_items.py::test_a_write_that_changes_nothing_writes_nothing",),
    ),
    Mutation(
        "tag-get-or-create",
        "Twenty requests bringing the same new tag at once all succeed (INSERT ... ON CONFLICT DO NOTHING)",
        "tags/tag.py",
        (
            (
                '.values([{"name": name} for name in sorted(names)]).on_conflict_do_nothing()',
                '.values([{"name": name} for name in sorted(names)])',
            ),
        ),
        (
            "tests/test_item_races.py::test_twenty_requests_that_bring_the_same_new_tag_at_once_all_succeed_and_share_one_tag",
        ),
        postgresql=True,
    ),
    Mutation(
        "one-transaction",
        "The article's case: a taken title with new tags leaves none of those tags",
        "items/item.py",
        (
            (
                "    tag_ids = lock_tags(session, item_in.tags)\n",
                "    tag_ids = lock_tags(session, item_in.tags)\n    session.commit()\n",
            ),
        ),
        ("tests/test_items.py::test_the_articles_case_a_taken_title_with_new_tags_leaves_none_of_those_tags",),
    ),
    Mutation(
        "lazy-raise",
        "No relationship is loaded lazily: a forgotten eager load is an error",
        "items/item.py",
        (
            (
                'sa_relationship_kwargs={"lazy": "raise", "passive_deletes": True}',
                'sa_relationship_kwargs={"lazy": "select", "passive_deletes": True}',
            ),
        ),
        ("tests/test_items.py::test_reading_an_items_tags_without_loading_them_is_an_error_not_a_hidden_query",),
    ),
    Mutation(
        "cursor-link",
        "A full page links to the next one by its last id",
        "core/paging.py",
        (('    response.headers["Link"] = f\'<{url.path}?{url.query}>; rel="next"\'\n', ""),),
        ("tests/test_items.py::test_following_the_links_visits_every_item_once_in_id_order_while_items_come_and_go",),
    ),
    Mutation(
        "exact-total",
        "X-Total-Count counts every insert and delete, whoever makes them (triggers)",
        "migrations/versions/0004_item_count.py",
        (
            (
                '    "CREATE TRIGGER item_count_delete AFTER DELETE ON item BEGIN UPDATE item_count SET items = items - 1; END",\n',
                "",
            ),
        ),
        ("tests/test_items.py::test_the_total_counts_every_insert_and_delete_whoever_makes_them",),
    ),
]


def copy_of_the_repository(into: Path) -> Path:
    copy = into / "repo"
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.db", "*.db-wal", "*.db-shm")
    shutil.copytree(ROOT, copy, ignore=ignore)
    return copy


def apply(mutation: Mutation, copy: Path) -> None:
    path = copy / mutation.file
    text = path.read_text()
    for old, new in mutation.edits:
        if (found := text.count(old)) != 1:
            raise SystemExit(f"{mutation.name}: {old.strip()!r} is found {found} times in {mutation.file}, not once")
        if "nullcontext()" in new:
            text = "from contextlib import nullcontext\n" + text
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(mutation: Mutation, copy: Path) -> tuple[int, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
    done = subprocess.run(
        command, check=False, cwd=copy, capture_output=True, text=True, timeout=900, env=os.environ.copy()
    )
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return done.returncode, summary


def check(mutation: Mutation) -> bool:
    """True when the mutation is caught: every run of its tests fails on a failing test."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as folder:
        copy = copy_of_the_repository(Path(folder))
        apply(mutation, copy)
        caught = True
        for run in range(1, mutation.runs + 1):
            started = time.monotonic()
            status, summary = run_tests(mutation, copy)
            seconds = time.monotonic() - started
            verdict = "caught" if status == PYTEST_TESTS_FAILED else "SURVIVED" if status == 0 else f"ERROR {status}"
            print(f"  run {run}/{mutation.runs}: {verdict} in {seconds:.0f} s ({summary})", flush=True)
            caught &= status == PYTEST_TESTS_FAILED
        return caught


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {mutation.claim}")
            print(
                "".join(f"  {mutation.file}: {old.strip()!r} -> {new.strip()!r}\n" for old, new in mutation.edits),
                end="",
            )
            print("".join(f"  -> {test}\n" for test in mutation.tests), end="")
        return
    if any(m.postgresql for m in chosen) and not os.environ.get("TEST_DATABASE_URL"):
        raise SystemExit("set TEST_DATABASE_URL: some of these mutations are only caught by PostgreSQL tests")
    survived = []
    for mutation in chosen:
        print(f"{mutation.name}: {mutation.claim}", flush=True)
        if not check(mutation):
            survived.append(mutation.name)
    print(f"mutations: {len(chosen) - len(survived)} caught, {len(survived)} survived {survived or ''}".rstrip())
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
