package e2e

import "github.com/agentd/agentd/internal/testkit/testutil"

// logBuffer collects a child's stderr; the test may read it while the child writes.
type logBuffer = testutil.Buffer
