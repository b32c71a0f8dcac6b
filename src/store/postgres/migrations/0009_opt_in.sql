-- Double opt-in: subscribers of the public form who have not confirmed yet, found by
-- the expiry sweep. `status` is text with no CHECK, so 'unconfirmed' needs no change
-- of the column.
CREATE INDEX subscribers_unconfirmed ON subscribers (created_at) WHERE status = 'unconfirmed';
