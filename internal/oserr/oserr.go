// Package oserr renders OS errors the way the reference agent (Rust's io::Error) does:
// "<strerror text> (os error N)". Hosts match on these strings (microsandbox's SFTP layer
// maps "No such file" and "Permission denied"), so the text must be glibc's, capitalized.
package oserr

import (
	"errors"
	"fmt"
	"syscall"
	"unicode"
	"unicode/utf8"
)

// Text returns Rust's rendering of err when it wraps an errno, else err's own text.
func Text(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return Errno(errno)
	}
	return err.Error()
}

// Errno renders one errno as "<Strerror> (os error N)".
func Errno(e syscall.Errno) string {
	s := e.Error()
	r, n := utf8.DecodeRuneInString(s)
	return fmt.Sprintf("%c%s (os error %d)", unicode.ToUpper(r), s[n:], int(e))
}
