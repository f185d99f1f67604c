"""drop the ledger's intent index: ix_llm_ledger_report leads with intent and serves the same lookups

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every router call inserts a ledger row: one index fewer to maintain per call.
    op.drop_index('ix_llm_ledger_intent', table_name='llm_ledger')


def downgrade() -> None:
    op.create_index('ix_llm_ledger_intent', 'llm_ledger', ['intent'], unique=False)
