package persistence

import "testing"

// Every schema version needs the step that reaches it, so that a file of any
// older version can be brought up to date.
func TestMigrationPerVersion(t *testing.T) {
	if len(migrations) != SchemaVersion {
		t.Fatalf("%d migrations for schema version %d", len(migrations), SchemaVersion)
	}
	for v, m := range migrations {
		if m == nil {
			t.Errorf("no migration from version %d", v)
		}
	}
}
