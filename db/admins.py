"""qrun's admins: who may set priority caps, prune other users' jobs and change this list.

The list lives in the job table (`admins`), so every machine and user of a shared Postgres table sees
the same one. A new table starts with its owner (the SQLite file's owner; on a server, whoever
created or upgraded the table) and root; the list is never left empty.
"""

from __future__ import annotations

import os
import pwd
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from qrun.db import audit
from qrun.db.errors import BadInput
from qrun.db.schema import Admin

ROOT = "root"


def login_name(uid: int) -> str:
    """The login name of `uid` (uidN for a uid without a passwd entry, as in containers)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def table_owner(conn: Connection) -> str:
    """Whom a new (or newly upgraded) table makes its first admin: the SQLite file's owner; on a server,
    the user running this qrun (who could create or alter the tables)."""
    database = conn.engine.url.database
    if conn.dialect.name == "sqlite" and database and Path(database).exists():
        return login_name(Path(database).stat().st_uid)
    return login_name(os.getuid())


def seed(conn: Connection) -> None:
    """The first admins of a table: its owner and root."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for name in dict.fromkeys([table_owner(conn), ROOT]):
        conn.execute(Admin.__table__.insert().values(name=name, added_by=name, added_at=now))


def _names(s: Session) -> list[str]:
    return list(s.execute(select(Admin.name).order_by(Admin.name)).scalars())


def admin_names(db) -> list[str]:
    with db.transaction() as s:
        return _names(s)


def require_admin(s: Session, user: str, what: str) -> None:
    """BadInput unless `user` is an admin, naming who is."""
    names = _names(s)
    if user not in names:
        raise BadInput(f"only qrun's admins ({', '.join(names) or 'none'}) may {what}, and {user} is not one: "
                       "ask one of them (`qrun admin list`)")


def check_admin(db, user: str, what: str) -> None:
    with db.transaction() as s:
        require_admin(s, user, what)


def add_admin(db, name: str, by: str) -> bool:
    """Make `name` an admin (only an admin may); whether it was not one already. Audit-logged."""
    with db.transaction() as s:
        require_admin(s, by, "change the admins")
        if s.get(Admin, name) is not None:
            return False
        s.add(Admin(name=name, added_by=by, added_at=datetime.now(timezone.utc).replace(tzinfo=None)))
        audit.record(s, by, "admin add", f"user {name}")
    return True


def remove_admin(db, name: str, by: str) -> bool:
    """Take `name` off the admins (only an admin may; never the last one); whether it was one. Audit-logged."""
    with db.transaction() as s:
        require_admin(s, by, "change the admins")
        names = _names(s)
        if name not in names:
            return False
        if names == [name]:
            raise BadInput(f"{name} is the last admin: add another (`qrun admin add USER`) before removing {name}")
        s.execute(delete(Admin).where(Admin.name == name))
        audit.record(s, by, "admin remove", f"user {name}")
    return True
