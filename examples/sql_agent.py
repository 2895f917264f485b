"""A LangChain SQL agent that corrects its own errors, rewarded by running its query on SQLite.

Each episode builds a small company database in memory (departments, employees, projects), asks
one question with a known answer, and lets the model write a SQLite query with LangChain's
`ChatOpenAI`. A query that fails (syntax error, unknown column, a write, a runaway query) sends
the error message back to the model, which may try again, up to `MAX_ATTEMPTS` queries. Rewards:
`FAILED_ATTEMPT_REWARD` (-0.1, a `lightspan.reward` span named "sql_error") after each failed
attempt, credited by the trainer to the call that wrote the bad query; then the final reward,
1 when the first query that runs returns the same rows as the reference query (as a multiset:
order and column names do not count), else 0.

Run it once against a served model, traced to a collector (how to start both: the end of
`--help`, or SETUP in examples/_run.py), then list the traced episodes:

    python examples/sql_agent.py                 # runs every task once, prints the mean reward
    lightspan rollouts --service sql-agent       # the traced episodes and their rewards

Train it (`fit` starts its own collector, server, trainer and runners in `--workdir`):

    python examples/sql_agent.py --train --model tiny-model --iterations 2 --group-size 4

which is

    lightspan.Trainer(model="tiny-model", algorithm=lightspan.GRPO(credit="step"), n_runners=2,
                      group_size=4, iterations=2).fit(sql_agent, TRAIN_TASKS, VAL_TASKS)

`credit="step"` credits each call its own intermediate rewards plus what follows, so a query that
failed earns less than the corrected one after it. The agent is a module-level function: the
runner processes import it by name.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from typing import Any

from _run import run_example
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

import lightspan
from lightspan.types import LLM

SERVICE = "sql-agent"
MAX_ATTEMPTS = 3
FAILED_ATTEMPT_REWARD = -0.1
QUERY_SECONDS = 2.0  # a query running longer (a runaway recursive CTE, a huge join) is an error

SCHEMA = """\
CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT NOT NULL,
                        department_id INTEGER NOT NULL REFERENCES departments(id),
                        salary INTEGER NOT NULL, hired DATE NOT NULL);
CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL,
                       department_id INTEGER NOT NULL REFERENCES departments(id), budget INTEGER NOT NULL);"""

DATA = """\
INSERT INTO departments VALUES (1, 'Engineering', 'Berlin'), (2, 'Sales', 'Paris'), (3, 'Research', 'Oslo'),
                               (4, 'Legal', 'Paris');
INSERT INTO employees VALUES (1, 'Ada', 1, 120000, '2019-03-01'), (2, 'Grace', 1, 115000, '2020-07-15'),
                             (3, 'Linus', 1, 98000, '2022-01-10'), (4, 'Marie', 3, 105000, '2018-09-03'),
                             (5, 'Alan', 3, 99000, '2021-05-20'), (6, 'Edsger', 2, 70000, '2017-11-30'),
                             (7, 'Barbara', 2, 76000, '2023-02-14'), (8, 'Ruth', 4, 88000, '2021-08-01');
INSERT INTO projects VALUES (1, 'Compiler', 1, 500000), (2, 'Search', 1, 250000), (3, 'Quantum', 3, 800000),
                            (4, 'Expansion', 2, 150000);"""

TASKS = [
    {
        "id": "sql-engineering-names",
        "question": "List the names of the employees in the Engineering department.",
        "gold": "SELECT e.name FROM employees e JOIN departments d ON d.id = e.department_id "
        "WHERE d.name = 'Engineering'",
    },
    {
        "id": "sql-count-employees",
        "question": "How many employees are there?",
        "gold": "SELECT COUNT(*) FROM employees",
    },
    {
        "id": "sql-top-salary",
        "question": "Who earns the highest salary? Return only the name.",
        "gold": "SELECT name FROM employees ORDER BY salary DESC LIMIT 1",
    },
    {
        "id": "sql-oslo-budget",
        "question": "What is the total budget of the projects of departments in Oslo?",
        "gold": "SELECT SUM(p.budget) FROM projects p JOIN departments d ON d.id = p.department_id "
        "WHERE d.city = 'Oslo'",
    },
    {
        "id": "sql-hired-since-2021",
        "question": "Which employees were hired in 2021 or later? Return their names.",
        "gold": "SELECT name FROM employees WHERE hired >= '2021-01-01'",
    },
    {
        "id": "sql-no-projects",
        "question": "Which departments have no projects? Return their names.",
        "gold": "SELECT name FROM departments WHERE id NOT IN (SELECT department_id FROM projects)",
    },
    {
        "id": "sql-average-salary",
        "question": "What is the average salary of each department? Return its name and the average.",
        "gold": "SELECT d.name, AVG(e.salary) FROM employees e JOIN departments d ON d.id = e.department_id "
        "GROUP BY d.name",
    },
    {
        "id": "sql-paris-headcount",
        "question": "How many employees work in departments located in Paris?",
        "gold": "SELECT COUNT(*) FROM employees e JOIN departments d ON d.id = e.department_id "
        "WHERE d.city = 'Paris'",
    },
]
TRAIN_TASKS, VAL_TASKS = TASKS[:6], TASKS[6:]

SYSTEM = "You write SQLite queries for these tables:\n{schema}\nReply with one SQL query and nothing else."
_FENCE = re.compile(r"```(?:sql)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def build_database() -> sqlite3.Connection:
    """A fresh in-memory copy of the example database, read-only once filled."""
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA + "\n" + DATA)
    db.execute("PRAGMA query_only = ON")  # the model's queries may read, never change, the data
    return db


def describe(db: sqlite3.Connection) -> str:
    """The schema for the prompt, one `table(column TYPE, ...)` line per table: the DDL costs
    several times the tokens, and small models have short contexts."""
    tables = [
        name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")
    ]
    return "\n".join(
        f"{table}({', '.join(f'{col[1]} {col[2]}' for col in db.execute(f'PRAGMA table_info({table})'))})"
        for table in tables
    )


def extract_sql(reply: str) -> str:
    """The query in a reply: the first ``` fenced block if there is one, else the whole text."""
    match = _FENCE.search(reply)
    return (match.group(1) if match else reply).strip()


def run_query(db: sqlite3.Connection, query: str) -> list[tuple[Any, ...]]:
    """Rows of `query`; any failure (including an empty or too slow query) is a `sqlite3.Error`."""
    if not query:
        raise sqlite3.ProgrammingError("the reply contains no SQL query")
    deadline = time.monotonic() + QUERY_SECONDS
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)  # non-zero aborts
    try:
        return db.execute(query).fetchall()
    finally:
        db.set_progress_handler(None, 0)


def same_rows(rows: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> bool:
    """Equal as multisets of rows: row order and column names do not matter, duplicates do."""
    return Counter(rows) == Counter(expected)


@lightspan.rollout
def sql_agent(task: dict, llm: LLM) -> float:
    """Write a query, run it, feed errors back; the returned reward is the final reward."""
    chat = ChatOpenAI(
        model=llm.model, base_url=llm.base_url, api_key=llm.api_key, temperature=1.0, max_tokens=128
    )
    db = build_database()
    try:
        expected = run_query(db, task["gold"])
        messages: list[BaseMessage] = [
            SystemMessage(SYSTEM.format(schema=describe(db))),
            HumanMessage(task["question"]),
        ]
        for _ in range(MAX_ATTEMPTS):
            reply = chat.invoke(messages)
            try:
                rows = run_query(db, extract_sql(reply.text))
            except sqlite3.Error as error:
                lightspan.emit_reward(FAILED_ATTEMPT_REWARD, name="sql_error", error=str(error))
                messages += [
                    reply,
                    HumanMessage(f"The query failed: {error}\nReply with a corrected query only."),
                ]
                continue
            return 1.0 if same_rows(rows, expected) else 0.0
        return 0.0
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    """Run every task once against a served model, or train the agent with `--train` (see above)."""
    return run_example(
        argv,
        description=__doc__,
        service=SERVICE,
        agent=sql_agent,
        train_tasks=TRAIN_TASKS,
        val_tasks=VAL_TASKS,
        algorithm=lightspan.GRPO(lr=1e-5, credit="step"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
