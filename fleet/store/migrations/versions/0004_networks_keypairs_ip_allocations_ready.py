"""networks, keypairs, static ip allocations; vm network, address mode, keys, ready

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('networks',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('bridge', sa.String(length=15), nullable=False, server_default=''),
    sa.Column('cidr', sa.String(length=43), nullable=False),
    sa.Column('gateway', sa.String(length=39), nullable=False),
    sa.Column('dns', sa.JSON(), nullable=False),
    sa.Column('dhcp_start', sa.String(length=39), nullable=False, server_default=''),
    sa.Column('dhcp_end', sa.String(length=39), nullable=False, server_default=''),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('keypairs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('public_key', sa.Text(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'name')
    )
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('network_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('address_mode', sa.String(length=8), nullable=False,
                                      server_default='dhcp'))
        batch_op.add_column(sa.Column('static_address', sa.String(length=39), nullable=False,
                                      server_default=''))
        batch_op.add_column(sa.Column('keypairs', sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))
        batch_op.add_column(sa.Column('ssh_keys', sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))
        batch_op.add_column(sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('boot_seconds', sa.Float(), nullable=True))
        batch_op.create_foreign_key('fk_vms_network_id_networks', 'networks',
                                    ['network_id'], ['id'])
    # One holder per address fleet-wide: the primary key decides between concurrent inserts.
    op.create_table('ip_allocations',
    sa.Column('network_id', sa.String(length=36), nullable=False),
    sa.Column('address', sa.String(length=39), nullable=False),
    sa.Column('vm_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['network_id'], ['networks.id'], ),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('network_id', 'address')
    )
    with op.batch_alter_table('ip_allocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ip_allocations_vm_id'), ['vm_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ip_allocations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ip_allocations_vm_id'))
    op.drop_table('ip_allocations')
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_constraint('fk_vms_network_id_networks', type_='foreignkey')
        batch_op.drop_column('boot_seconds')
        batch_op.drop_column('ready_at')
        batch_op.drop_column('ssh_keys')
        batch_op.drop_column('keypairs')
        batch_op.drop_column('static_address')
        batch_op.drop_column('address_mode')
        batch_op.drop_column('network_id')
    op.drop_table('keypairs')
    op.drop_table('networks')
