src/a/b/c.go
