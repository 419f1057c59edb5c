package oserr

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
)

func TestText(t *testing.T) {
	cases := []struct {
		err  error
		want string
	}{
		{syscall.ECONNREFUSED, "Connection refused (os error 111)"},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, "Connection refused (os error 111)"},
		{&os.PathError{Op: "open", Path: "/x", Err: syscall.ENOENT}, "No such file or directory (os error 2)"},
		{fmt.Errorf("wrapped: %w", syscall.EACCES), "Permission denied (os error 13)"},
		{errors.New("plain"), "plain"},
	}
	for _, c := range cases {
		if got := Text(c.err); got != c.want {
			t.Errorf("Text(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}
