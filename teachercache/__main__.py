from teachercache.cli import main

main(prog_name="teachercache")
