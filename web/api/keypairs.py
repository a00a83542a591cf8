"""/api/v1/keypairs: SSH public keys a project imports and gives to its VMs by name.

Strictly per project, admins included: another project's keypair is simply not found.
Keys are checked by fleet.sshkeys (400 saying what is wrong); the private half never comes
here. Deleting a keypair leaves VMs made with it alone: each VM keeps the keys it was
created with.
"""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet import sshkeys
from fleet.exceptions import Conflict, NotFound
from fleet.store.models import Keypair
from web.api.schemas import KeypairCreateSchema, KeypairSchema
from web.auth import Principal, current, login_required

blp = Blueprint("keypairs", __name__, description="SSH public keys for VMs")


def find_keypair(session: Session, ref: str, who: Principal) -> Keypair:
    """A keypair of the caller's project by name (or id)."""
    kp = session.scalars(select(Keypair).where(Keypair.project_id == who.project_id,
                                               (Keypair.name == ref) | (Keypair.id == ref))
                         ).first()
    if kp is None:
        raise NotFound(f"keypair '{ref}' not found")
    return kp


def find_keypairs(session: Session, names: list[str], who: Principal) -> list[Keypair]:
    """The caller's keypairs named `names`, in that order (repeats dropped); NotFound names
    every one that is missing."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    rows = {kp.name: kp for kp in session.scalars(
        select(Keypair).where(Keypair.project_id == who.project_id,
                              Keypair.name.in_(wanted)))}
    missing = [n for n in wanted if n not in rows]
    if missing:
        raise NotFound("keypair " + ", ".join(f"'{n}'" for n in missing)
                       + f" not found in project {who.project}: import it first "
                         "(POST /api/v1/keypairs)")
    return [rows[n] for n in wanted]


@blp.route("/keypairs")
class Keypairs(MethodView):
    decorators = [login_required()]

    @blp.response(200, KeypairSchema(many=True))
    def get(self):  # type: ignore[no-untyped-def]
        """List this project's keypairs."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return list(s.scalars(select(Keypair).where(Keypair.project_id == current().project_id)
                                  .order_by(Keypair.name)))

    @blp.arguments(KeypairCreateSchema)
    @blp.response(201, KeypairSchema)
    def post(self, data):  # type: ignore[no-untyped-def]
        """Import a public key (one line of an OpenSSH .pub file)."""
        who = current()
        key = sshkeys.parse(data["public_key"])
        with current_app.extensions["virtfleet.store"].session() as s:
            if s.scalars(select(Keypair.id).where(Keypair.project_id == who.project_id,
                                                  Keypair.name == data["name"])).first():
                raise Conflict(f"a keypair named '{data['name']}' already exists")
            kp = Keypair(project_id=who.project_id, name=data["name"], public_key=key.line,
                         fingerprint=key.fingerprint)
            s.add(kp)
            try:
                s.flush()
            except IntegrityError:  # the same name, created concurrently
                raise Conflict(f"a keypair named '{data['name']}' already exists") from None
            return kp


@blp.route("/keypairs/<ref>")
class KeypairByRef(MethodView):
    decorators = [login_required()]

    @blp.response(200, KeypairSchema)
    def get(self, ref: str):  # type: ignore[no-untyped-def]
        """Show a keypair."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return find_keypair(s, ref, current())

    @blp.response(204)
    def delete(self, ref: str):  # type: ignore[no-untyped-def]
        """Delete a keypair (VMs made with it keep their keys)."""
        with current_app.extensions["virtfleet.store"].session() as s:
            s.delete(find_keypair(s, ref, current()))
