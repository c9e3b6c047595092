"""The console alone (``nnrouter web``) and its users (``nnrouter users add|list|token|disable``)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import OK, add, group


def cmd_web(args: argparse.Namespace) -> int:
    """Serve the console, API and metrics of this store without the DICOM node (``serve`` runs it as a stage)."""
    from nnrouter.web.stage import run_web

    settings = common.settings(args)
    common.require_current_schema(common.store(settings))
    run_web(settings, expect_stages=False)  # stops on SIGTERM / SIGINT
    return OK


def _audited(store: Any, settings: Any, action: str, target: str, **detail: Any) -> None:
    """The audit row of a change made from this command line, by the operator who ran it."""
    from nnrouter.core import audit

    audit.record(
        store, source="cli", actor=_operator(), action=action, target=target, node=settings.node.name, **detail
    )


def _operator() -> str:
    """Who ran the command, for the audit (a container may have no name for its uid)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _password(args: argparse.Namespace) -> str:
    """From NNROUTER_PASSWORD (scripts), else asked twice on the terminal; never an argument (ps shows those)."""
    given = os.environ.get("NNROUTER_PASSWORD")
    if given is not None:
        return given
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise common.Unusable("the two passwords differ")
    return first


def cmd_users_add(args: argparse.Namespace) -> int:
    from nnrouter.web import users

    settings = common.settings(args)
    store = common.store(settings)
    common.require_current_schema(store)
    try:
        made = users.add(store, args.name, args.role, _password(args), replace=args.replace)
    except users.UserError as exc:
        return common.err(str(exc))
    _audited(store, settings, "user_add", made.name, role=made.role)
    if args.json:
        common.print_json({"name": made.name, "role": made.role})
    else:
        print(f"user {made.name} ({made.role}) ready")
    return OK


def cmd_users_list(args: argparse.Namespace) -> int:
    from nnrouter.web import users

    rows = users.listing(common.store(common.settings(args)))
    if args.json:
        common.print_json(rows)
    else:
        for r in rows:
            print(f"{r['name']:<24} {r['role']:<7} {'disabled' if r['disabled'] else ''}")
    return OK


def cmd_users_token(args: argparse.Namespace) -> int:
    from nnrouter.web import users

    settings = common.settings(args)
    store = common.store(settings)
    try:
        token = users.new_token(store, args.name)
    except users.UserError as exc:
        return common.err(str(exc))
    _audited(store, settings, "user_token", args.name)
    if args.json:
        common.print_json({"name": args.name, "token": token})
    else:
        print(token)
        print("(shown once: send it as `Authorization: Bearer <token>`)", file=sys.stderr)
    return OK


def cmd_users_disable(args: argparse.Namespace) -> int:
    from nnrouter.web import users

    settings = common.settings(args)
    store = common.store(settings)
    try:
        users.set_disabled(store, args.name, not args.enable)
    except users.UserError as exc:
        return common.err(str(exc))
    _audited(store, settings, "user_enable" if args.enable else "user_disable", args.name)
    if args.json:
        common.print_json({"name": args.name, "disabled": not args.enable})
    else:
        print(f"user {args.name} {'enabled' if args.enable else 'disabled'}")
    return OK


def register(sub: Any) -> None:
    add(sub, "web", cmd_web, "serve the console, REST API and /metrics alone (serve runs it when http.enabled)")
    us = group(sub, "users", "who may log in to the console")
    a = add(us, "add", cmd_users_add, "add a user (password from NNROUTER_PASSWORD, stdin or the terminal)", json=True)
    a.add_argument("name")
    a.add_argument("--role", choices=["viewer", "admin"], required=True)
    a.add_argument("--replace", action="store_true", help="set a new password and role for an existing user")
    add(us, "list", cmd_users_list, "list users", json=True)
    t = add(us, "token", cmd_users_token, "make a new API token for a user (the old one stops working)", json=True)
    t.add_argument("name")
    d = add(us, "disable", cmd_users_disable, "stop a user logging in (its sessions and token end)", json=True)
    d.add_argument("name")
    d.add_argument("--enable", action="store_true", help="let the user log in again")
